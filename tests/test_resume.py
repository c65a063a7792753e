"""Checkpoints and resume: a run stopped anywhere (Ctrl-C, or killed after a periodic checkpoint)
and resumed gives bitwise the same losses, metrics and adapter as the same run uninterrupted.

Oracle: the uninterrupted run with the same seed, on CPU. Run: .venv/bin/python -m pytest
tests/test_resume.py -q
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import train

QUICK = ["--model", "tiny", "--steps", "8", "--batch-size", "8", "--log-every", "1",
         "--save-every", "3", "--threads", "1"]
FAST = {"fim": ["--calib-batches", "2"], "da": ["--da-samples", "16"], "fw": ["--fw-warmup", "4"]}


def run(out, *extra):
    method = extra[extra.index("--method") + 1] if "--method" in extra else "lora"
    fast = [f for m, flags in FAST.items() if m in method.split("+") for f in flags]
    return train.main([*QUICK, *fast, "--out", str(out), *extra])


def stop_at(monkeypatch, step: int, how: str):
    """After `step` finished, deliver Ctrl-C (the loop checkpoints, then stops) or crash (only
    the periodic checkpoints survive, as after a kill)."""
    real = train.log_step

    def log_step(k, *a):
        real(k, *a)
        if k == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("killed")
    monkeypatch.setattr(train, "log_step", log_step)


def adapter_bytes(out):
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("method,step,how", [
    ("lora", 5, "signal"), ("lora", 5, "crash"),
    ("fim", 2, "signal"), ("da", 7, "crash"),
    ("fw", 2, "signal"),   # inside the FW-LoRA warm-up
    ("fw", 6, "signal"),   # after it: the importances are frozen and saved
    ("fw", 5, "crash"),    # resumes from step 3, inside the warm-up, and crosses it
])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, monkeypatch, method, step, how):
    full = run(tmp_path / "full", "--method", method, "--seed", "4")
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        stop_at(m, step, how)
        with pytest.raises(train.Interrupted if how == "signal" else RuntimeError):
            run(out, "--method", method, "--seed", "4")
    assert not (out / "results.json").exists() and (out / "checkpoint" / "state.pt").is_file()
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == (step if how == "signal" else step // 3 * 3)
    torch.load(out / "checkpoint" / "state.pt", weights_only=True)  # plain tensors and types
    resumed = train.main(["--resume", str(out)])
    assert resumed["train_loss"] == full["train_loss"]  # every logged loss, bit for bit
    assert resumed["metrics"] == full["metrics"] and resumed["ranks"] == full["ranks"]
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "full")
    assert not (out / "checkpoint").exists()  # finished: nothing left to resume


def test_resume_with_fw_tracking_every_other_step_equals_uninterrupted(tmp_path, monkeypatch):
    """--fw-track-every 2: a crash at step 5 resumes from 3 (an untracked step follows) and
    crosses the warm-up; losses and adapter are bitwise the uninterrupted run's."""
    extra = ["--method", "fw", "--seed", "4", "--fw-track-every", "2"]
    full = run(tmp_path / "full", *extra)
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        stop_at(m, 5, "crash")
        with pytest.raises(RuntimeError):
            run(out, *extra)
    resumed = train.main(["--resume", str(out)])
    assert resumed["train_loss"] == full["train_loss"]
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "full")

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
    assert (out / "checkpoint" / "meta.json").is_file() and not (out / "results.json").exists()


def test_finished_run_is_refused_unless_overwrite_and_kept_until_replaced(tmp_path, monkeypatch):
    out = tmp_path / "o"
    first = run(out, "--seed", "1")
    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match="finished run.*--overwrite"):
        run(out, "--seed", "2")
    assert (out / "results.json").read_bytes() == before
    with monkeypatch.context() as m:  # an --overwrite run that dies keeps the old results
        stop_at(m, 5, "crash")
        with pytest.raises(RuntimeError):
            run(out, "--seed", "2", "--overwrite")
    assert json.loads((out / "results.json").read_text())["seed"] == first["seed"] == 1
    with pytest.raises(ValueError, match="--resume"):  # now an unfinished run is there too
        run(out, "--seed", "2")
    second = run(out, "--seed", "2", "--overwrite")
    assert json.loads((out / "results.json").read_text())["train_loss"] == second["train_loss"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "results.json"]


def test_interrupted_publish_is_completed_and_stale_temp_files_removed(tmp_path):
    """A kill after .publish was complete but before it was moved in: the next start (resume
    or overwrite) finishes the move, and half-written temp folders are dropped."""
    out = tmp_path / "o"
    run(out, "--seed", "1")
    (out / ".publish").mkdir()
    os.replace(out / "results.json", out / ".publish" / "results.json")
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "state.pt").write_bytes(b"half")
    train.runfolder.tidy_out(out)
    assert (out / "results.json").is_file() and not (out / ".publish").exists()
    assert not (out / "checkpoint.tmp").exists()


def test_checkpoint_survives_a_kill_between_its_two_renames(tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        stop_at(m, 7, "crash")
        with pytest.raises(RuntimeError):
            run(out, "--seed", "3")
    os.replace(out / "checkpoint", out / "checkpoint.tmp")  # the moment between the renames
    blob, meta = train.runfolder.read_checkpoint(out)
    assert meta["step"] == 6
    full = run(tmp_path / "full", "--seed", "3")
    assert train.main(["--resume", str(out)])["train_loss"] == full["train_loss"]


@pytest.mark.parametrize("damage,match", [
    (lambda c: (c / "meta.json").write_text("{not json"), "not a readable"),
    (lambda c: (c / "meta.json").write_text('{"step": "7"}'), "field 'step'"),
    (lambda c: (c / "state.pt").write_bytes(b"\0" * 10), "not a readable"),
    (lambda c: (c / "state.pt").unlink(), "lacks state.pt"),
])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, monkeypatch, damage, match):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        stop_at(m, 4, "crash")
        with pytest.raises(RuntimeError):
            run(out)
    damage(out / "checkpoint")
    with pytest.raises(ValueError, match=match):
        train.main(["--resume", str(out)])


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
    assert (out / "results.json").is_file() and not (out / "checkpoint").exists()


@pytest.mark.parametrize("method,step,how", [
    ("lora", 5, "crash"),   # resumes from the step-3 checkpoint: replays 3 x 2 batches
    ("fw", 2, "signal"),    # inside the FW-LoRA warm-up
    ("fw", 5, "crash"),     # from step 3, inside the warm-up, across its end
])
def test_resume_with_grad_accum_equals_uninterrupted_run_bitwise(tmp_path, monkeypatch, method,
                                                                  step, how):
    """--grad-accum 2: checkpoints hold whole optimizer steps, and a resume replays 2 batches
    per finished step, so losses, metrics and adapter are bitwise the uninterrupted run's."""
    extra = ["--method", method, "--seed", "4", "--grad-accum", "2"]
    full = run(tmp_path / "full", *extra)
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        stop_at(m, step, how)
        with pytest.raises(train.Interrupted if how == "signal" else RuntimeError):
            run(out, *extra)
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == (step if how == "signal" else 3) and meta["args"]["grad_accum"] == 2
    resumed = train.main(["--resume", str(out)])
    assert resumed["train_loss"] == full["train_loss"] and len(full["train_loss"]) == 8
    assert resumed["metrics"] == full["metrics"]
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "full")


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


@pytest.mark.parametrize("save_every", ["1000", "1"])
def test_a_second_run_into_a_held_folder_is_refused_by_name(tmp_path, save_every):
    """While one process owns --out, another run there (with or without checkpoints) exits 1
    naming the owner's pid, and leaves the folder alone."""
    out = tmp_path / "o"
    with train.runfolder.lock(out):
        proc = cli(out, "--save-every", save_every)
        _, err = proc.communicate(timeout=300)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.startswith(f"error: --out {out} is in use by pid {os.getpid()} (host "), err
    assert not out.exists()  # the owner created it and left it empty: gone with the lock


@pytest.mark.parametrize("save_every", ["1000", "1"])
def test_two_runs_started_together_into_one_out_one_wins_the_other_is_refused(tmp_path,
                                                                               save_every):
    """Issue 20.1: two runs started together (seeds 0 and 1) into one --out: exactly one
    publishes, the other exits 1 with a clean refusal (in use, or finished if the winner was
    already done when it looked), and the folder holds the winner's run."""
    out = tmp_path / "o"
    procs = [cli(out, "--seed", str(s), "--save-every", save_every, steps="40")
             for s in (0, 1)]
    done = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(d[2] for d in done)
    assert codes == [0, 1], done
    winner = next(s for s, d in enumerate(done) if d[2] == 0)
    err = next(d[1] for d in done if d[2] == 1)
    assert err.startswith("error: --out") and "Traceback" not in err, err
    assert "is in use by pid" in err or "holds a finished run" in err, err
    assert json.loads((out / "results.json").read_text())["seed"] == winner
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "results.json"]


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
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "results.json"]


# -----------------------------------------------------------------------------
# every state a kill or a failed delete can leave has one way out


def crashed(out, step=4, *extra):
    """A run killed after `step` (checkpoint at 3 with --save-every 3)."""
    with pytest.MonkeyPatch.context() as m:
        stop_at(m, step, "crash")
        with pytest.raises(RuntimeError):
            run(out, *extra)


def test_an_undeletable_old_checkpoint_never_blocks_later_saves(tmp_path, monkeypatch, capsys):
    """Issue 20.3: the replaced checkpoint cannot be deleted (a root-owned read-only folder, an
    NFS .nfsXXXX file): every save still swaps its checkpoint in, the run publishes the bitwise
    result, and a warning names the leftover folder."""
    full = run(tmp_path / "full", "--seed", "2")
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if ".trash-checkpoint-" not in str(path):
            real(path, *a, **k)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    out = tmp_path / "o"
    res = run(out, "--seed", "2", "--save-every", "1")
    assert res["train_loss"] == full["train_loss"]
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "full")
    left = sorted(p.name for p in out.glob(".trash-checkpoint-*"))
    assert len(left) >= 2 and "warning: could not delete" in capsys.readouterr().err


def test_a_finished_run_with_a_partial_checkpoint_counts_as_finished(tmp_path):
    """A kill while an older save() deleted checkpoint/ after publishing left it without
    meta.json: a rerun says finished (--overwrite), --resume says finished, and the next run
    into the folder removes the leftover."""
    out = tmp_path / "o"
    run(out, "--seed", "1")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"half")
    with pytest.raises(ValueError, match="holds a finished run"):
        run(out, "--seed", "1")
    with pytest.raises(FileNotFoundError, match="nothing to resume .the run finished"):
        train.main(["--resume", str(out)])
    run(out, "--seed", "1", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "results.json"]


def test_a_partial_checkpoint_alone_names_overwrite(tmp_path):
    out = tmp_path / "o"
    crashed(out)
    (out / "checkpoint" / "meta.json").unlink()
    with pytest.raises(ValueError, match="partial checkpoint.*pass --overwrite"):
        run(out)
    with pytest.raises(ValueError, match="lacks meta.json.*again with --overwrite"):
        train.main(["--resume", str(out)])
    assert len(run(out, "--overwrite")["train_loss"]) == 8


def test_a_partial_checkpoint_beside_a_complete_staged_one_resumes_from_that(tmp_path):
    full = run(tmp_path / "full", "--seed", "3")
    out = tmp_path / "o"
    crashed(out, 4, "--seed", "3")
    shutil.copytree(out / "checkpoint", out / "checkpoint.tmp")
    (out / "checkpoint" / "meta.json").unlink()
    with pytest.raises(ValueError, match="unfinished run.*--resume"):
        run(out, "--seed", "3")
    assert train.main(["--resume", str(out)])["train_loss"] == full["train_loss"]


def test_a_kill_after_publishing_leaves_a_finished_run(tmp_path, monkeypatch):
    """Killed between the rename to .publish and the move into place (the checkpoint still
    there), or while the checkpoint was being deleted: either way the folder holds a finished
    run, never a partial checkpoint."""
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(train.runfolder, "_move_in", lambda out: (_ for _ in ()).throw(
            RuntimeError("killed")))
        with pytest.raises(RuntimeError):
            run(out, "--seed", "1")
    assert (out / ".publish" / "results.json").is_file() and (out / "checkpoint").is_dir()
    with pytest.raises(ValueError, match="holds a finished run"):
        run(out, "--seed", "1")
    with pytest.raises(FileNotFoundError, match="no checkpoint/ folder .the run finished"):
        train.main(["--resume", str(out)])  # which finished the move
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "results.json"]
    real, out2 = shutil.rmtree, tmp_path / "o2"

    def rmtree(path, *a, **k):  # killed half-way through deleting the checkpoint
        if ".trash-checkpoint-" in str(path) and (out2 / ".publish").is_dir():
            os.unlink(os.path.join(path, "meta.json"))
            raise RuntimeError("killed")
        real(path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree)
        with pytest.raises(RuntimeError):
            run(out2, "--seed", "1")
    assert not (out2 / "checkpoint").exists() and (out2 / ".publish" / "results.json").is_file()
    with pytest.raises(ValueError, match="holds a finished run"):
        run(out2, "--seed", "1")


# -----------------------------------------------------------------------------
# resume refuses what it cannot honour


def edit_meta(out, edit):
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    edit(meta)
    (out / "checkpoint" / "meta.json").write_text(json.dumps(meta))


def edit_state(out, edit):
    blob = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    edit(blob)
    torch.save(blob, out / "checkpoint" / "state.pt")


def _int64(blob):
    blob["model"] = {k: v.long() for k, v in blob["model"].items()}


def _huge(blob, meta=None):
    blob["step"] = 10 ** 9


@pytest.mark.parametrize("meta_edit,state_edit,match", [
    (lambda m: m["args"].update(method="bogus"), None, "argument 'method' = 'bogus'"),
    (lambda m: m["args"].pop("steps"), None, r"arguments missing: \['steps'\]"),
    (lambda m: m["args"].update(steps=None), None, "argument 'steps'"),
    (lambda m: m["args"].update(steps=2), None, "step 3 lies outside the run's 1..2 steps"),
    (lambda m: m["args"].update(lr="0.1"), None, "argument 'lr'"),
    (None, lambda b: b.update(losses=[]), "holds 0 losses for step 3"),
    (None, _int64, "do not fit the model"),
    (lambda m: m.update(step=10 ** 9), _huge, "holds 3 losses for step 1000000000"),
    (lambda m: m.update(segments=[3]), None, "field 'segments'"),
])
def test_resume_refuses_a_checkpoint_it_cannot_honour(tmp_path, meta_edit, state_edit, match):
    """Issue 20.5: args, step and tensors are checked against the run they continue, before any
    batch is replayed."""
    out = tmp_path / "o"
    crashed(out)
    if meta_edit:
        edit_meta(out, meta_edit)
    if state_edit:
        edit_state(out, state_edit)
    with pytest.raises(ValueError, match=match):
        train.main(["--resume", str(out)])


def test_resume_records_each_segments_threads_and_world_size(tmp_path, capsys):
    """--resume --threads 2 of a --threads 1 run: both segments are in results.json, and the
    run says the bitwise promise does not hold across them."""
    out = tmp_path / "o"
    crashed(out)
    res = train.main(["--resume", str(out), "--threads", "2"])
    assert res["segments"] == [{"from_step": 0, "threads": 1, "world_size": 1},
                               {"from_step": 3, "threads": 2, "world_size": 1}]
    assert json.loads((out / "results.json").read_text())["segments"] == res["segments"]
    assert "not bitwise an uninterrupted run's" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# disk full and unreadable files: the file, what survived, the command


def test_disk_full_at_a_checkpoint_names_the_file_the_intact_step_and_the_resume(
        tmp_path, monkeypatch):
    full = run(tmp_path / "full", "--seed", "6")
    out, real, calls = tmp_path / "o", torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "x" / "state.pt"))
        real(obj, f, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        with pytest.raises(ValueError) as e:
            run(out, "--seed", "6")
    assert str(e.value) == (
        f"cannot write {out}/x/state.pt (No space left on device); the last checkpoint (step 3) "
        f"in {out}/checkpoint is intact: continue with "
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


def test_an_unreadable_meta_json_is_named_with_the_fix(tmp_path, monkeypatch):
    """Mode 000 (simulated: the tests may run as root, whom chmod does not stop)."""
    out = tmp_path / "o"
    crashed(out)
    real = os.open

    def deny(path, *a, **k):
        if str(path).endswith("meta.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ValueError, match=f"cannot read {out}/checkpoint/meta.json: Permission "
                                         "denied: make it readable .chmod u.r"):
        train.main(["--resume", str(out)])


def test_a_kill_in_the_middle_of_moving_a_publish_in_loses_nothing(tmp_path, monkeypatch):
    """An --overwrite run killed after its adapter was moved in but before results.json: the
    next start finishes the move and keeps the new adapter (it once deleted it as "old")."""
    out = tmp_path / "o"
    run(out, "--seed", "1")
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".publish/results.json"):
            raise RuntimeError("killed")
        real(src, dst)
    with monkeypatch.context() as m:
        m.setattr(train.runfolder.os, "replace", replace)
        with pytest.raises(RuntimeError):
            run(out, "--seed", "2", "--overwrite")
    new_adapter = adapter_bytes(out)
    train.runfolder.tidy_out(out)
    assert adapter_bytes(out) == new_adapter
    assert json.loads((out / "results.json").read_text())["seed"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "results.json"]
