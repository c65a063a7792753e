"""The run folder (--out): one owner at a time, checkpoints, publishing, and recovery from a kill.
Every change of state is one rename, so a kill at any instant leaves each name whole or absent,
and tidy_out (the next run, under the lock) finds the one way on:

    with lock(out):                          # "--out X is in use by pid N" for a second run
        tidy_out(out)                        # finish a publish, put back a checkpoint
        save_checkpoint(out, blob, meta)     # checkpoint.tmp/ -> checkpoint/
        publish(out, write)                  # .publish.tmp/ -> .publish/ -> moved in
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lora import atomic_write, fsync_dir, open_regular, read_regular

CHECKPOINT, STATE, META = "checkpoint", "state.pt", "meta.json"
PUBLISHED = ("results.json", "adapter", "adapter_peft")  # results.json last: it marks "finished"
LOCK, TRASH, PUBLISH = ".lock", ".trash-", ".publish"
JSON_BYTES, STATE_BYTES = 64 << 20, 16 << 30  # meta.json / results.json; state.pt
STAGED = CHECKPOINT + ".tmp"  # a complete one (meta.json is written last) is the newest


def complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / STATE).is_file()


def finished(out: Path) -> bool:
    return (out / "results.json").exists() or (out / PUBLISH).is_dir()


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold <out>/.lock, an flock the kernel drops when its owner dies, for the block (ValueError
    names a live owner); out is created if needed, removed at the end if left empty."""
    new = next((p for p in [out, *out.parents][::-1] if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
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
        for p in [out, *out.parents] if new is not None else []:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty: this run wrote nothing there
            if p == new:
                break


def remove(path: Path) -> None:
    """Delete a file or folder: renamed to a unique .trash-* name (atomic), then deleted; what
    cannot be deleted stays, named in a warning, and never blocks the name."""
    if os.path.lexists(path):
        trash = path.with_name(f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        _delete(trash)


def _delete(trash: Path) -> None:
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(OSError):
        trash.unlink()
    if os.path.lexists(trash):
        print(f"warning: could not delete {trash}: delete it by hand (it may belong to another "
              "user or root); runs go on without it", file=sys.stderr)


def tidy_out(out: Path) -> None:
    """Finish an interrupted publish, drop trash and temp folders, and put in a complete
    checkpoint.tmp that a kill caught between the two renames of its swap."""
    if (out / PUBLISH).is_dir():
        _move_in(out)
    for trash in out.glob(TRASH + "*"):
        _delete(trash)
    if complete(out / STAGED) and not complete(out / CHECKPOINT):
        remove(out / CHECKPOINT)
        os.replace(out / STAGED, out / CHECKPOINT)
    for stale in (STAGED, PUBLISH + ".tmp"):
        remove(out / stale)


# -----------------------------------------------------------------------------
# checkpoints and results: write(<name>.tmp/), then one rename


def _stage(out: Path, name: str, write: Callable[[Path], None]) -> None:
    """write(folder) into <out>/<name>.tmp/, then renamed to <name> (an old one removed first:
    between the two, the complete .tmp folder is the newest)."""
    tmp = out / (name + ".tmp")
    remove(tmp)
    tmp.mkdir()
    write(tmp)
    fsync_dir(tmp)
    remove(out / name)
    os.replace(tmp, out / name)
    fsync_dir(out)


def save_checkpoint(out: Path, blob: dict, meta: dict) -> None:
    """<out>/checkpoint/: state.pt (tensors, torch.save) and meta.json (written last)."""
    def write(folder: Path) -> None:
        atomic_write(folder / STATE, lambda f: torch.save(blob, f))
        write_json(folder / META, meta)
    _stage(out, CHECKPOINT, write)


def read_checkpoint(out: Path) -> tuple[dict, dict]:
    """(state.pt, meta.json) of <out>'s checkpoint, their fields checked for type and agreement;
    else ValueError or FileNotFoundError naming what is wrong and the way out."""
    done = " (the run finished: results.json is there)" if finished(out) else ""
    folder = next((f for f in (out / CHECKPOINT, out / STAGED) if complete(f)), out / CHECKPOINT)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {out}: no {CHECKPOINT}/ folder{done}")
    if not os.path.lexists(folder / META) and done:
        raise FileNotFoundError(f"--resume {out}: nothing to resume{done}; its partial "
                                f"{CHECKPOINT}/ is removed by the next run into {out}")
    for name in (META, STATE):
        if not os.path.lexists(folder / name):
            raise ValueError(f"--resume {out}: the checkpoint lacks {name} (a partial checkpoint):"
                             " nothing can resume from it; run the original command again with "
                             "--overwrite")
    text = read_regular(folder / META, JSON_BYTES)  # a FIFO or a huge file: named
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {out}: {folder / META} is not a readable fimlora "
                         f"checkpoint ({type(e).__name__})") from None
    if isinstance(meta, dict):
        meta.setdefault("segments", [])  # written since segments were recorded
    fields = {"step": int, "seed": int, "args": dict, "ranks": dict, "alphas": dict,
              "report": dict, "evals": list, "segments": list}
    for field, kind in fields.items():
        value = meta.get(field) if isinstance(meta, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (
                field == "segments" and not all(isinstance(s, dict) for s in value)):
            raise ValueError(f"{folder / META}: field {field!r} is missing or not a "
                             f"{kind.__name__}; the checkpoint is damaged")
    with open_regular(folder / STATE, STATE_BYTES) as f:
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, foreign or unsafe pickle: name it, never a traceback
            raise ValueError(f"--resume {out}: {folder / STATE} is not a readable fimlora "
                             f"checkpoint ({type(e).__name__})") from None
    losses = blob.get("losses") if isinstance(blob, dict) else None
    if not isinstance(losses, list) or not all(type(v) is float and math.isfinite(v)
                                               for v in losses) or blob.get("step") != meta["step"]:
        raise ValueError(f"{folder / STATE} does not match {META} (step, finite losses): the "
                         "checkpoint is damaged")
    if len(losses) != meta["step"] or meta["step"] < 1:  # the rest: train.restore's checks
        raise ValueError(f"{folder / STATE} holds {len(losses)} losses for step "
                         f"{meta['step']}: the checkpoint is damaged")
    return blob, meta


def publish(out: Path, write: Callable[[Path], None]) -> None:
    """write(folder) puts the run's PUBLISHED entries into .publish.tmp/, renamed to .publish/
    once complete (the run counts as finished from here), then moved in."""
    _stage(out, PUBLISH, write)
    _move_in(out)


def _move_in(out: Path) -> None:
    """Move a complete .publish/ into out: the checkpoint and the old entries go first,
    results.json comes last. .publish/.moving marks the old entries gone, so a rerun after a
    kill never deletes an entry already moved in."""
    pub = out / PUBLISH
    if not (pub / ".moving").exists():
        for name in (CHECKPOINT, STAGED, *PUBLISHED):
            remove(out / name)
        (pub / ".moving").touch()
        fsync_dir(pub)
    for name in PUBLISHED[::-1]:
        if (pub / name).exists():
            os.replace(pub / name, out / name)
    (pub / ".moving").unlink()
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


# -----------------------------------------------------------------------------
# checks and messages


def check_out(out: Path, resume: bool, overwrite: bool, resume_cmd: str) -> None:
    """--out must be a path this system can create, and a writable folder (or creatable as
    one) that holds no run, unless --resume or --overwrite (resume_cmd: the command that
    continues it). Writes nothing."""
    base = next(p for p in [out, *out.parents, Path(".")] if os.path.isdir(p))
    name_max, path_max = os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX")
    shown = str(out) if len(str(out)) < 100 else f"{str(out)[:60]}...({len(str(out)):,} chars)"
    room = path_max - 1 - len(f"/{STAGED}/{STATE}")  # the longest path a run writes
    long = [c for c in out.parts if len(os.fsencode(c)) > name_max]
    if long:
        raise ValueError(f"--out {shown}: the name {long[0][:40]}... has "
                         f"{len(os.fsencode(long[0]))} bytes, over this file system's {name_max} "
                         "(NAME_MAX): use a shorter name")
    if len(os.fsencode(os.path.abspath(out))) > room:
        raise ValueError(f"--out {shown}: the path is too long for the files a run writes in it "
                         f"(at most {room} bytes, PATH_MAX {path_max}): use a shorter path")
    probe = next(p for p in [out, *out.parents] if os.path.lexists(p))
    if not os.path.exists(probe):
        raise ValueError(f"--out {out}: {probe} is a symbolic link to a missing target or a "
                         "link loop: fix or remove the link, or pick another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder path")
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {probe} is not a writable folder; pick another --out")
    if resume or overwrite or not out.is_dir():
        return
    done = finished(out)
    if not (out / PUBLISH).is_dir() and (complete(out / CHECKPOINT) or complete(out / STAGED)):
        raise ValueError(f"--out {out} holds an unfinished run{' (and a finished one)' * done}"
                         f": continue it with '{resume_cmd}', or pass --overwrite")
    if done:
        raise ValueError(f"--out {out} holds a finished run (results.json): pass --overwrite to "
                         "replace it, or choose another --out")
    if (out / CHECKPOINT).is_dir():
        raise ValueError(f"--out {out} holds a partial checkpoint ({META} or {STATE} missing): "
                         "nothing can resume from it; pass --overwrite to start over")


def resumed_args(cli: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The saved arguments of the run in --resume OUT (--threads from the command line), each
    one the parser could give; the checkpoint's step within --steps."""
    out = Path(cli.resume)
    if not out.is_dir():
        raise FileNotFoundError(f"--resume {out}: no such run folder")
    meta = read_checkpoint(out)[1]
    saved, where = meta["args"], out / CHECKPOINT / META
    missing, unknown = sorted(set(vars(cli)) - set(saved)), sorted(set(saved) - set(vars(cli)))
    if missing or unknown:
        raise ValueError(f"{where}: {'arguments missing:' if missing else 'unknown arguments'} "
                         f"{(missing or unknown)[:5]}; the checkpoint comes from another version "
                         "of train.py or is damaged")
    bad = [a.dest for a in parser._actions if a.dest in saved and not _parses(a, saved[a.dest])]
    if bad:
        raise ValueError(f"{where}: argument {bad[0]!r} = {str(saved[bad[0]])[:40]!r} is not a "
                         "value train.py accepts; the checkpoint is damaged")
    if not 1 <= meta["step"] <= saved["steps"]:
        raise ValueError(f"{where}: step {meta['step']} lies outside the run's "
                         f"1..{saved['steps']} steps; the checkpoint is damaged")
    return argparse.Namespace(**{**saved, "resume": str(out), "overwrite": False,
                                 "out": str(out), "threads": cli.threads or saved["threads"]})


def _parses(action: argparse.Action, v) -> bool:
    """Whether the parser could have produced v (resolved defaults are never None)."""
    if action.nargs == 0:  # a switch
        return isinstance(v, bool)
    if v is None:
        return action.default is None and action.dest not in ("steps", "lr", "targets", "out")
    try:  # --data resolves --task to "data"
        return (action.dest, v) == ("task", "data") or not isinstance(v, bool) and (
            action.type or str)(str(v)) == v and v in (action.choices or [v])
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


@contextlib.contextmanager
def write_errors(out: Path, resume: str) -> Iterator[None]:
    """An OSError while writing into out (disk full, no permission) as a ValueError naming the
    file, what survived and the command `resume` that continues once the cause is fixed."""
    try:
        yield
    except OSError as e:
        step = None
        for folder in (out / CHECKPOINT, out / STAGED):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                step = step or int(json.loads(read_regular(folder / META, JSON_BYTES))["step"])
        kept = (f"the results are complete in {out / PUBLISH}; '{resume}' moves them in"
                if (out / PUBLISH).is_dir() else
                f"the last checkpoint (step {step:,}) in {out / CHECKPOINT} is intact: continue "
                f"with '{resume}'" if step is not None else
                "no checkpoint was written: run the same command again")
        fix = ("free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
               "make it writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
               "fix the cause")
        raise ValueError(f"cannot write {e.filename or out} ({e.strerror or e}); {kept} once you "
                         f"{fix}") from None
