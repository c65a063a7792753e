"""Checkpoints and resume: a run stopped anywhere (Ctrl-C, or killed after a periodic checkpoint)
and resumed gives bitwise the same losses, metrics and adapter as the same run uninterrupted.

Oracle: the uninterrupted run with the same seed, on CPU. Run: .venv/bin/python -m pytest
tests/test_resume.py -q
"""

import json
import os
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
    train.tidy_out(out)
    assert (out / "results.json").is_file() and not (out / ".publish").exists()
    assert not (out / "checkpoint.tmp").exists()


def test_checkpoint_survives_a_kill_between_its_two_renames(tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        stop_at(m, 7, "crash")
        with pytest.raises(RuntimeError):
            run(out, "--seed", "3")
    os.replace(out / "checkpoint", out / "checkpoint.old")  # the moment between the renames
    blob, meta = train.read_checkpoint(out)
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
