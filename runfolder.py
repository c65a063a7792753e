"""The run folder (--out): one owner, one checkpoint file, publishing. Every change of state is one
rename, so a kill leaves each name whole or absent, and tidy_out (the next run) finds the way on:

    with lock(out):                          # "--out X is in use by pid N" for a second run
        tidy_out(out)                        # finish a publish, drop temp files
        save_checkpoint(out, ckpt, step)     # checkpoint.pt: torch.save of a dict
        log(out, {"step": 1, "loss": 0.7})   # a line of log.jsonl
        publish(out, write, step)            # .publish/ (results.json last) -> moved in
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lora import atomic_write, fsync_dir, lora_layers, open_regular, resize_lora

CHECKPOINT = "checkpoint.pt"  # a dict, torch.save (nanoGPT's ckpt.pt)
PUBLISHED = ("results.json", "adapter", "adapter_peft")  # results.json marks "finished"
LOCK, TRASH, PUBLISH, MOVING = ".lock", ".trash-", ".publish", ".moving"
FIELDS = {"step", "args", "model", "ranks", "alphas", "optimizer", "scheduler", "rng", "losses",
          "evals", "seconds", "fw", "report"}  # checkpoint()'s


def command(*argv: str | os.PathLike) -> str:
    """A command line for a message, runnable as printed: the interpreter running now ("python"
    when that is the one on PATH, e.g. in an activated venv)."""
    on_path = shutil.which("python")
    same = on_path and os.path.abspath(on_path) == sys.executable
    return shlex.join(["python" if same else sys.executable, *map(str, argv)])


def staged(out: Path) -> bool:
    """A complete .publish/: results.json is written into it last, .moving marks the move."""
    return (out / PUBLISH / PUBLISHED[0]).is_file() or (out / PUBLISH / MOVING).exists()


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold <out>/.lock, an flock the kernel drops when its owner dies, for the block (ValueError
    names a live owner); out is created if needed, removed at the end if left empty."""
    new = not os.path.lexists(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a name too long, a dangling link, a link loop
        raise ValueError(f"--out {out}: cannot create it ({e.strerror}): pick another") from None
    while True:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = {}
            with contextlib.suppress(ValueError):  # unreadable while the owner writes it
                owner = json.loads(os.read(fd, 4096))
            os.close(fd)
            raise ValueError(f"--out {out} is in use by pid {owner.get('pid', '?')} (host "
                             f"{owner.get('host', '?')}): wait for that run to end, or pick "
                             "another --out") from None
        except OSError as e:  # ENOLCK: a network file system without locks
            os.close(fd)
            raise ValueError(f"--out {out}: cannot lock {out / LOCK} ({e.strerror}); pick an "
                             "--out on a file system with locks (a local disk)") from None
        with contextlib.suppress(FileNotFoundError):  # an owner unlinks it before it lets go
            if os.stat(out / LOCK).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    try:
        yield
    finally:
        os.unlink(out / LOCK)
        os.close(fd)
        with contextlib.suppress(OSError):
            if new:
                out.rmdir()  # only if empty: this run wrote nothing there


def remove(path: Path) -> None:
    """Delete a file or folder: renamed to a unique .trash-* name first (atomic: the name is free
    at once, never half deleted), then deleted as far as possible."""
    if os.path.lexists(path):
        trash = path.with_name(f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):  # what cannot be deleted never blocks the name
            trash.unlink()


def tidy_out(out: Path) -> None:
    """Finish a complete publish; drop an incomplete one and the trash a kill left."""
    if staged(out):
        move_in(out)
    for left in [out / PUBLISH, *out.glob(TRASH + "*")]:
        remove(left)


def checkpoint(model: torch.nn.Module, opt, sched, rng: dict, state: dict, args) -> dict:
    """What a resume needs, one dict (nanoGPT's): trainable tensors, ranks, optimizer, schedule,
    the generators the loop draws from, and the losses, evals, report and FW-LoRA state so far."""
    layers = lora_layers(model)
    return {"step": len(state["losses"]), "args": vars(args), "report": state["report"],
            "model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "ranks": {n: m.r for n, m in layers.items()},
            "alphas": {n: m.alpha for n, m in layers.items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {"data": rng["data"].get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "losses": state["losses"], "evals": state["evals"], "seconds": state["seconds"],
            "fw": state["fw"]}


def restore(model: torch.nn.Module, opt, sched, state: dict, ckpt: dict, out: str) -> None:
    """The checkpoint into the freshly built run (its ranks first), or ValueError if it does not
    fit it."""
    try:
        for name, layer in lora_layers(model).items():
            resize_lora(layer, int(ckpt["ranks"][name]), alpha=float(ckpt["alphas"][name]))
        saved = ckpt["model"]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        bad = sorted(set(params) ^ set(saved)) + [n for n in params if n in saved and (
            saved[n].shape, saved[n].dtype) != (params[n].shape, params[n].dtype)]
        if bad or len(ckpt["losses"]) != ckpt["step"]:
            raise ValueError(f"the checkpoint's tensors or losses do not fit the run {bad[:3]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"--resume {out}: {e if isinstance(e, ValueError) else repr(e)}: "
                         f"{CHECKPOINT} is damaged, or a peer's checkpoint, which resumes with the "
                         "command that started it (transformers + PEFT)") from None
    state.update(losses=ckpt["losses"], seconds=ckpt["seconds"], evals=ckpt["evals"],
                 fw=ckpt["fw"])


def read_checkpoint(out: Path) -> dict:
    """<out>/checkpoint.pt as saved, or ValueError / FileNotFoundError naming the way out."""
    path = out / CHECKPOINT
    if not os.path.lexists(path):
        done = " (the run finished: results.json is there)" if (out / PUBLISHED[0]).exists() else ""
        old = (f"; {out}/checkpoint/ is an older fimlora's: start over with --overwrite"
               if (out / "checkpoint").is_dir() else "")
        raise FileNotFoundError(f"--resume {out}: no {CHECKPOINT}{done}{old}")
    with open_regular(path) as f:
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, foreign or unsafe pickle: named, never a traceback
            raise ValueError(f"--resume {out}: {path} is not a readable fimlora checkpoint "
                             f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not FIELDS <= set(ckpt):
        raise ValueError(f"--resume {out}: {path} lacks the fields of a fimlora checkpoint "
                         f"{sorted(FIELDS)}: it is damaged or another program's")
    return ckpt


def save_checkpoint(out: Path, ckpt: dict, step: int) -> None:
    """ckpt into <out>/checkpoint.pt in one rename (`step`: the last good checkpoint's)."""
    with write_errors(out, step):
        atomic_write(out / CHECKPOINT, lambda f: torch.save(ckpt, f))


def publish(out: Path, write: Callable[[Path], None], step: int) -> None:
    """write(folder) puts the run's PUBLISHED entries into .publish/ (results.json last: the run
    counts as finished from then on), then they are moved into out."""
    with write_errors(out, step):
        remove(out / PUBLISH)
        (out / PUBLISH).mkdir()
        write(out / PUBLISH)
        fsync_dir(out / PUBLISH)
        move_in(out)


def move_in(out: Path) -> None:
    """Move a complete .publish/ into out: the old entries (results.json first) and the checkpoint
    go, then the new ones come, results.json last. .publish/.moving marks the old entries gone,
    so a rerun after a kill never deletes an entry already moved in."""
    pub = out / PUBLISH
    if not (pub / MOVING).exists():
        for name in (*PUBLISHED, CHECKPOINT):
            remove(out / name)
        (pub / MOVING).touch()
        fsync_dir(pub)
    for name in PUBLISHED[::-1]:
        if (pub / name).exists():
            os.replace(pub / name, out / name)
    (pub / MOVING).unlink()
    os.rmdir(pub)
    fsync_dir(out)


def finite(obj):
    """obj with every NaN or ±inf float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Strict JSON (a non-finite float becomes null), written atomically."""
    text = json.dumps(finite(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def log(out: Path, record: dict) -> None:
    """Append one JSON line (a logged step or an eval) to <out>/log.jsonl; rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(finite(record)) + "\n")


def trim_log(out: Path, step: int) -> None:
    """A fresh run starts <out>/log.jsonl anew; a resumed one keeps its lines up to the
    checkpoint's step (a killed run may have logged past it, or half a line)."""
    if (out / "log.jsonl").is_file() and int(os.environ.get("RANK", "0")) == 0:
        lines = (out / "log.jsonl").read_text(errors="replace").splitlines() if step else []
        kept = [line + "\n" for line in lines  # the lines up to the step are whole
                if (m := re.match(r'\{"step": (\d+)', line)) and int(m[1]) <= step]
        atomic_write(out / "log.jsonl", lambda f: f.write("".join(kept).encode()))


def check_out(args) -> None:
    """args.out must be a writable folder (or creatable as one) that holds no run, unless
    --resume or --overwrite. Writes nothing."""
    out, resume, overwrite = Path(args.out), args.resume is not None, args.overwrite
    probe = next(p for p in [out, *out.parents] if os.path.exists(p))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {probe} is not a writable folder; pick another --out")
    if probe != out or resume or overwrite:  # (a name the system refuses: lock's error)
        return
    if not staged(out) and (out / CHECKPOINT).is_file():
        raise ValueError(f"--out {out} holds an unfinished run: continue it with '"
                         f"{command('train.py', '--resume', out)}', or pass --overwrite")
    if (out / PUBLISHED[0]).exists() or staged(out):
        raise ValueError(f"--out {out} holds a finished run (results.json): pass --overwrite to "
                         "replace it, or choose another --out")
    names = [n for n in (*PUBLISHED[1:], "log.jsonl") if os.path.lexists(out / n)
             and not (n == "log.jsonl" and our_log(out / n))]  # (a run killed before a checkpoint)
    if names:
        raise ValueError(f"--out {out} holds {', '.join(names)} but no run (no results.json or "
                         f"{CHECKPOINT}): a run would replace {'it' if len(names) == 1 else 'them'}"
                         "; choose another --out, or pass --overwrite")


def our_log(path: Path) -> bool:
    """log.jsonl as log() writes it: empty, or its first line a JSON object with a "step"."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
        return not first or "step" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def write_errors(out: Path, step: int) -> Iterator[None]:
    """An OSError while writing into out (disk full, no permission) as a ValueError naming the
    file, what survived (the checkpoint of `step`, 0: none) and the command that continues."""
    try:
        yield
    except OSError as e:
        kept = (f"the results are complete in {out / PUBLISH}: move its entries into {out}"
                if staged(out) else f"the last checkpoint (step {step:,}) in {out / CHECKPOINT} "
                f"is intact: continue with '{command('train.py', '--resume', out)}'" if step else
                "no checkpoint was written: run the same command again")
        fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause"
        raise ValueError(f"cannot write {e.filename or out} ({e.strerror or e}); {kept} once you "
                         f"{fix}") from None
