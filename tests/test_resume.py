"""Checkpoints and resume: a run stopped anywhere (Ctrl-C, or killed after a periodic checkpoint)
and resumed gives bitwise the same losses, metrics and adapter as the same run uninterrupted; the
run folder has one owner, a finished run is never overwritten, and a kill at any instant leaves a
folder the next run continues.

Oracle: the uninterrupted run with the same seed, on CPU. Run: .venv/bin/python -m pytest
tests/test_resume.py -q
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import train
from runfolder import CHECKPOINT, FIELDS

QUICK = ["--model", "tiny", "--steps", "8", "--batch-size", "8", "--log-every", "1",
         "--save-every", "3", "--threads", "1"]
FAST = {"fim": ["--calib-batches", "2"], "da": ["--da-samples", "16"], "fw": ["--fw-warmup", "4"]}
DONE = ["adapter", "log.jsonl", "results.json"]  # a finished run's folder


def argv(out, *extra):
    method = extra[extra.index("--method") + 1] if "--method" in extra else "lora"
    fast = [f for m, flags in FAST.items() if m in method.split("+") for f in flags]
    return [*QUICK, *fast, "--out", str(out), *extra]


def run(out, *extra):
    return train.main(argv(out, *extra))


def stopped(command: list[str], step: int, how: str) -> int:
    """train.main(command) stopped after `step` finished by Ctrl-C (the loop checkpoints, then
    stops) or a crash (only the periodic checkpoints survive, as after a kill); returns the
    step of the checkpoint left in --out."""
    real = train.log_step

    def log_step(k, *a):
        real(k, *a)
        if k == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("killed")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "log_step", log_step)
        with pytest.raises(train.Interrupted if how == "signal" else RuntimeError):
            args = train.parse_args(command)
            train.run(args)
    return torch.load(os.path.join(args.out, CHECKPOINT), weights_only=True)["step"]


def adapter_bytes(out):
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("extra,stops", [
    (["--method", "lora"], [(2, "signal"), (5, "crash")]),  # from 2, then from the step-3 save
    (["--method", "fim"], [(2, "signal")]),
    (["--method", "da"], [(7, "crash")]),
    (["--method", "fim+da"], [(4, "signal")]),
    # inside FW-LoRA's warm-up (EMA saved); from step 3 across its end; after it (importances)
    (["--method", "fw"], [(2, "signal"), (5, "crash"), (6, "signal")]),
    (["--method", "fw", "--fw-track-every", "2"], [(5, "crash")]),  # an untracked step next
    # --grad-accum 2: checkpoints hold whole steps, a resume replays 2 batches a step
    (["--method", "lora", "--grad-accum", "2"], [(5, "crash")]),
    (["--method", "fw", "--grad-accum", "2"], [(2, "signal"), (5, "crash")]),
], ids=["lora", "fim", "da", "fim+da", "fw", "fw-track-2", "lora-accum-2", "fw-accum-2"])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, extra, stops):
    """Stopped once or several times and resumed each time: every loss, the metrics, ranks and
    adapter bytes are the uninterrupted run's."""
    full = run(tmp_path / "full", *extra, "--seed", "4")
    out = tmp_path / "stopped"
    command = argv(out, *extra, "--seed", "4")
    for step, how in stops:
        assert stopped(command, step, how) == (step if how == "signal" else step // 3 * 3)
        assert not (out / "results.json").exists()
        command = ["--resume", str(out)]
    resumed = train.main(command)
    assert resumed["train_loss"] == full["train_loss"] and len(full["train_loss"]) == 8
    assert resumed["metrics"] == full["metrics"] and resumed["ranks"] == full["ranks"]
    assert resumed["args"] == full["args"] | {"out": str(out), "resume": str(out)}
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "full")
    assert sorted(p.name for p in out.iterdir()) == DONE  # finished: nothing left to resume


def test_ctrl_c_exits_130_with_the_resume_command(tmp_path):
    """A real SIGINT to the CLI: exit status 130, one line naming the resume command, no
    traceback, a checkpoint on disk and no results."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "train.py", *QUICK, "--steps", "100000",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"python train.py --resume {out}" in err and "Traceback" not in err
    assert (out / CHECKPOINT).is_file() and not (out / "results.json").exists()


def test_finished_run_is_refused_unless_overwrite_and_kept_until_replaced(tmp_path):
    out = tmp_path / "o"
    first = run(out, "--seed", "1")
    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match="finished run.*--overwrite"):
        run(out, "--seed", "2")
    assert (out / "results.json").read_bytes() == before
    stopped(argv(out, "--seed", "2", "--overwrite"), 5, "crash")  # dies: the old results stay
    assert json.loads((out / "results.json").read_text())["seed"] == first["seed"] == 1
    with pytest.raises(ValueError, match="unfinished run: continue it with .*--resume"):
        run(out, "--seed", "2")
    second = train.main(["--resume", str(out)])
    assert json.loads((out / "results.json").read_text())["train_loss"] == second["train_loss"]
    assert second["seed"] == 2 and sorted(p.name for p in out.iterdir()) == DONE


@pytest.mark.parametrize("name,content", [("adapter/notes.txt", "mine"),
                                          ("adapter_peft", None), ("log.jsonl", '{"mine": 1}')])
def test_a_users_files_under_a_runs_names_are_refused_unless_overwrite(tmp_path, name, content):
    """--out a folder of the user's that holds adapter/, adapter_peft/ or its own log.jsonl
    (no results.json, no checkpoint): the run would replace them, so it is refused and they
    are kept; --overwrite replaces them."""
    out, path = tmp_path / "o", tmp_path / "o" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content) if content else path.mkdir()
    with pytest.raises(ValueError, match=f"holds {name.split('/')[0]} but no run .*--overwrite"):
        run(out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        {name, name.split("/")[0]})
    run(out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == DONE


def test_a_log_left_by_a_run_killed_before_its_first_checkpoint_is_started_anew(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.69}\n')  # what such a kill leaves
    run(out)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 9))  # the old line gone


def test_ctrl_c_in_a_compare_twin_run_points_at_the_saved_run(tmp_path, monkeypatch):
    """--compare trains twins in temp folders after this run published: a Ctrl-C there names
    the saved results, not a resume command for a checkpoint about to be deleted."""
    real, hits = train.log_step, []

    def log_step(k, *a):
        real(k, *a)
        if k == 2:
            hits.append(k)
            if len(hits) == 2:  # step 2 of the first twin (the run itself passed it once)
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train, "log_step", log_step)
    out = tmp_path / "o"
    with pytest.raises(train.Interrupted, match="--compare's uniform twin run: this run's "
                                                "results are already in"):
        run(out, "--method", "fim", "--compare")
    assert sorted(p.name for p in out.iterdir()) == DONE


# -----------------------------------------------------------------------------
# one owner per run folder (runfolder.lock)

LOCK_HOLDER = """import sys, time; sys.path.insert(0, {root!r}); from pathlib import Path
import runfolder
with runfolder.lock(Path({out!r})):
    print("held", flush=True); time.sleep(120)"""


def cli(out, *extra, steps="8"):
    return subprocess.Popen([sys.executable, "train.py", *QUICK, "--steps", steps, "--out",
                             str(out), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_run_into_a_held_folder_is_refused_by_name(tmp_path):
    """While --out is owned (flock: a second open file of this process counts as another
    owner), another run there is refused naming the owner's pid, and leaves the folder alone."""
    out = tmp_path / "o"
    with train.runfolder.lock(out):
        with pytest.raises(ValueError, match=f"^--out {out} is in use by pid {os.getpid()} "):
            run(out, "--save-every", "1")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert not out.exists()  # the owner created it and left it empty: gone with the lock


def test_two_runs_started_together_into_one_out_one_wins_the_other_is_refused(tmp_path):
    """Issue 20.1: two runs started together (seeds 0 and 1) into one --out: exactly one
    publishes, the other exits 1 with a clean refusal (in use, or finished if the winner was
    already done when it looked), and the folder holds the winner's run."""
    out = tmp_path / "o"
    procs = [cli(out, "--seed", str(s), "--save-every", "1", steps="20") for s in (0, 1)]
    done = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert sorted(d[2] for d in done) == [0, 1], done
    winner = next(s for s, d in enumerate(done) if d[2] == 0)
    err = next(d[1] for d in done if d[2] == 1)
    assert err.startswith("error: --out") and "Traceback" not in err, err
    assert "is in use by pid" in err or "holds a finished run" in err, err
    assert json.loads((out / "results.json").read_text())["seed"] == winner
    assert sorted(p.name for p in out.iterdir()) == DONE


def test_a_lock_left_by_a_killed_owner_is_taken_over(tmp_path):
    """kill -9 of the owner leaves <out>/.lock naming a dead pid; the kernel dropped its flock,
    so the next run takes the folder and removes the lock when done."""
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(root=str(ROOT),
                                                                        out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"is in use by pid {holder.pid}"):
        run(out)
    holder.kill()
    holder.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid  # stale, left behind
    assert run(out, "--seed", "5")["seed"] == 5
    assert sorted(p.name for p in out.iterdir()) == DONE


# -----------------------------------------------------------------------------
# every state a kill can leave has one way out


def test_a_kill_while_publishing_leaves_a_finished_run_the_next_start_moves_in(tmp_path,
                                                                            monkeypatch):
    """Killed once .publish/ was complete (its results.json written last) but before it was
    moved in, or half-way through moving it in: the folder counts as finished, and the next
    start finishes the move, keeping the new entries (the move once deleted them as "old")."""
    out = tmp_path / "o"
    run(out, "--seed", "1")
    for victim in ("move_in", ".publish/results.json"):
        real = os.replace

        def replace(src, dst):
            if str(src).endswith(".publish/results.json"):
                raise RuntimeError("killed")
            real(src, dst)
        with monkeypatch.context() as m:
            if victim == "move_in":
                m.setattr(train.runfolder, "move_in", lambda out: (_ for _ in ()).throw(
                    RuntimeError("killed")))
            else:
                m.setattr(train.runfolder.os, "replace", replace)
            with pytest.raises(RuntimeError):
                run(out, "--seed", "2", "--overwrite")
        assert (out / ".publish" / "results.json").is_file()
        new_adapter = adapter_bytes(out / ".publish" if victim == "move_in" else out)
        with pytest.raises(ValueError, match="holds a finished run"):
            run(out, "--seed", "3")
        train.runfolder.tidy_out(out)
        with pytest.raises(FileNotFoundError, match="no checkpoint.pt .the run finished"):
            train.main(["--resume", str(out)])
        assert adapter_bytes(out) == new_adapter
        assert json.loads((out / "results.json").read_text())["seed"] == 2
        assert sorted(p.name for p in out.iterdir()) == DONE


def test_an_incomplete_publish_and_trash_are_dropped(tmp_path):
    """A kill while .publish/ was written (no results.json yet) or while a .trash-* entry was
    deleted: the next start removes both, and the run's checkpoint resumes."""
    out = tmp_path / "o"
    stopped(argv(out), 4, "crash")
    (out / ".publish" / "adapter").mkdir(parents=True)
    (out / ".trash-adapter-1234").mkdir()
    train.runfolder.tidy_out(out)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT, "log.jsonl"]


@pytest.mark.parametrize("damage,match", [
    (lambda out: (out / CHECKPOINT).write_bytes(b"\0" * 10), "is not a readable fimlora "),
    (lambda out: torch.save({"step": 3}, out / CHECKPOINT), "lacks the fields"),
    (lambda out: os.unlink(out / CHECKPOINT), "no checkpoint.pt$"),
    (lambda out: os.makedirs(out / "checkpoint") or os.unlink(out / CHECKPOINT),
     "checkpoint/ is an older fimlora's: start over with --overwrite"),
])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage, match):
    out = tmp_path / "o"
    stopped(argv(out), 4, "crash")
    damage(out)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.main(["--resume", str(out)])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model={k: v.long() for k, v in c["model"].items()}), "do not fit"),
    (lambda c: c.update(losses=[]), "do not fit the run"),
    (lambda c: c["ranks"].popitem(), "KeyError"),
])
def test_resume_refuses_a_checkpoint_that_does_not_fit_the_run(tmp_path, edit, match):
    """Tensors, losses and ranks are checked against the run they continue, before any batch
    is replayed."""
    out = tmp_path / "o"
    stopped(argv(out), 4, "crash")
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert set(ckpt) == FIELDS  # what read_checkpoint requires is what is saved
    edit(ckpt)
    torch.save(ckpt, out / CHECKPOINT)
    with pytest.raises(ValueError, match=f"--resume {out}: .*{match}.*is damaged, or a peer's"):
        train.main(["--resume", str(out)])


# -----------------------------------------------------------------------------
# disk full and unreadable files: the file, what survived, the command


def test_disk_full_at_a_checkpoint_names_the_file_the_intact_step_and_the_resume(
        tmp_path, monkeypatch):
    full = run(tmp_path / "full", "--seed", "6")
    out, real, calls = tmp_path / "o", torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / CHECKPOINT))
        real(obj, f, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        with pytest.raises(ValueError) as e:
            run(out, "--seed", "6")
    assert str(e.value) == (
        f"cannot write {out}/{CHECKPOINT} (No space left on device); the last checkpoint (step "
        f"3) in {out}/{CHECKPOINT} is intact: continue with "
        f"'{train.command('train.py', '--resume', out)}' once you free disk space")
    assert train.main(["--resume", str(out)])["train_loss"] == full["train_loss"]


@pytest.mark.parametrize("save_every,kept", [
    ("3", "the last checkpoint (step 6)"), ("100", "no checkpoint was written")])
def test_disk_full_while_publishing_keeps_the_checkpoint_and_says_so(tmp_path, monkeypatch,
                                                                      save_every, kept):
    out, real = tmp_path / "o", train.save_adapter

    def save_adapter(path, *a, **k):
        if str(out) in str(path):  # the publish, not the check before step 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(train, "save_adapter", save_adapter)
        with pytest.raises(ValueError, match=f"No space left on device.; {re.escape(kept)}"):
            run(out, "--save-every", save_every)
    if save_every == "3":
        assert len(train.main(["--resume", str(out)])["train_loss"]) == 8
    else:
        assert len(run(out, "--save-every", save_every)["train_loss"]) == 8


def test_an_unreadable_checkpoint_is_named_with_the_fix(tmp_path, monkeypatch):
    """Mode 000 (simulated: the tests may run as root, whom chmod does not stop)."""
    out = tmp_path / "o"
    stopped(argv(out), 4, "crash")
    real = os.open

    def deny(path, *a, **k):
        if str(path).endswith(CHECKPOINT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ValueError, match=f"cannot read {out}/{CHECKPOINT}: Permission "
                                         "denied: make it readable .chmod u.r"):
        train.main(["--resume", str(out)])
