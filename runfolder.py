"""The run folder (--out) on disk: one owner at a time, atomic swaps and deletes, tidying what a
kill left, bounded reads, and write failures as messages that say what survived.

    with lock(out):            # "--out X is in use by pid N (host H)" for a second run
        tidy_out(out)          # finish an interrupted publish, drop temp folders
        ...

A folder is only ever replaced by a rename (replace_dir, remove), so a kill at any instant leaves
each name either whole or absent; what a delete leaves behind is a ".trash-*" folder, which the
next run into the folder removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from lora import read_regular

CHECKPOINT, STATE, META = "checkpoint", "state.pt", "meta.json"
PUBLISHED = ("results.json", "adapter", "adapter_peft")  # results.json last: it marks "finished"
LOCK, TRASH = ".lock", ".trash-"
JSON_BYTES, STATE_BYTES = 64 << 20, 16 << 30  # meta.json / results.json; state.pt


def complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds both of its files (else a partial leftover)."""
    return (folder / META).is_file() and (folder / STATE).is_file()


def finished(out: Path) -> bool:
    return (out / "results.json").exists() or (out / ".publish").is_dir()


def last_checkpoint(out: Path) -> int | None:
    """The step of the checkpoint a --resume would continue from, or None."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        try:
            step = json.loads(read_regular(out / name / META, JSON_BYTES))["step"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if isinstance(step, int):
            return step
    return None


# -----------------------------------------------------------------------------
# one owner per folder


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold <out>/.lock (an flock, which the kernel drops when its process dies: a lock left by
    a killed run is simply taken over) for the block; out is created if needed, and removed
    again at the end if the block left it empty. ValueError names the live owner."""
    new = next((p for p in [out, *out.parents][::-1] if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.read(fd, 4096))
            except ValueError:  # the owner is writing it this instant
                owner = {}
            os.close(fd)
            raise ValueError(f"--out {out} is in use by pid {owner.get('pid', '?')} (host "
                             f"{owner.get('host', '?')}): wait for that run to end, or pick "
                             "another --out") from None
        except OSError as e:  # ENOLCK: a network file system without locks
            os.close(fd)
            raise ValueError(f"--out {out}: cannot lock {path} ({e.strerror}); pick an --out on "
                             "a file system with locks (a local disk)") from None
        try:  # an owner unlinks the file before it lets go: ours must still be the one there
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)
        if new is not None:
            for p in [out, *out.parents]:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if empty: this run wrote nothing there
                if p == new:
                    break


# -----------------------------------------------------------------------------
# swaps and deletes that a kill cannot leave half done


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or folder: first renamed to a unique .trash-* name beside it (atomic: the
    name is gone whole or not at all), then deleted; what cannot be deleted stays, named in a
    warning, and never blocks the name again."""
    if os.path.lexists(path):
        trash = path.with_name(f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        _delete(trash)


def _delete(trash: Path) -> None:
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            trash.unlink()
    if os.path.lexists(trash):
        print(f"warning: could not delete {trash}: delete it by hand (it may belong to another "
              "user or root); runs go on without it", file=sys.stderr)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap the finished folder tmp in for final, keeping final as final.old until tmp is in."""
    old = final.with_name(final.name + ".old")
    remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    remove(old)


def publish_move(out: Path) -> None:
    """Move a complete .publish folder into out: the checkpoint (its own run's, now redundant)
    and old entries go first, results.json comes last. Idempotent: .publish/.moving marks the
    old entries gone, so a rerun after a kill never deletes an entry already moved in."""
    pub = out / ".publish"
    if not (pub / ".moving").exists():
        for name in (CHECKPOINT, CHECKPOINT + ".old", *PUBLISHED):
            remove(out / name)
        (pub / ".moving").touch()
        fsync_dir(pub)
    for name in PUBLISHED[::-1]:
        if (pub / name).exists():
            os.replace(pub / name, out / name)
    (pub / ".moving").unlink()
    os.rmdir(pub)
    fsync_dir(out)


def tidy_out(out: Path) -> None:
    """Bring out to a state one command continues (start of every run, under the lock): finish an
    interrupted publish, drop temp and trash folders, put back a checkpoint caught between its two
    renames, and drop a partial checkpoint beside a finished run or a complete checkpoint.old."""
    if (out / ".publish").is_dir():
        publish_move(out)
    for stale in (".publish.tmp", CHECKPOINT + ".tmp"):
        remove(out / stale)
    for trash in out.glob(TRASH + "*"):
        _delete(trash)
    ckpt, old = out / CHECKPOINT, out / (CHECKPOINT + ".old")
    if ckpt.is_dir() and not complete(ckpt) and (finished(out) or complete(old)):
        remove(ckpt)
    if old.is_dir() and not complete(old) and (finished(out) or complete(ckpt)):
        remove(old)
    if complete(old) and not ckpt.is_dir():
        os.replace(old, ckpt)  # killed mid-swap


# -----------------------------------------------------------------------------
# checks and messages


def check_out(out: Path, resume: bool, overwrite: bool, resume_cmd: str) -> None:
    """--out must be a path this system can create, (or be creatable as) a writable folder that
    holds no run, unless --resume or --overwrite (resume_cmd: the command that continues it).
    Writes nothing."""
    _check_path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder path")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {probe} is not a writable folder; pick another --out")
    if resume or overwrite or not out.is_dir():
        return
    done = finished(out)
    if not (out / ".publish").is_dir() and any(
            complete(out / n) for n in (CHECKPOINT, CHECKPOINT + ".old")):
        raise ValueError(f"--out {out} holds an unfinished run{' (and a finished one)' * done}"
                         f": continue it with '{resume_cmd}', or pass "
                         "--overwrite")
    if done:
        raise ValueError(f"--out {out} holds a finished run (results.json): pass --overwrite to "
                         "replace it, or choose another --out")
    if (out / CHECKPOINT).is_dir() or (out / (CHECKPOINT + ".old")).is_dir():
        raise ValueError(f"--out {out} holds a partial checkpoint ({META} or {STATE} missing): "
                         "nothing can resume from it; pass --overwrite to start over")


def _check_path(out: Path) -> None:
    """NAME_MAX, PATH_MAX, dangling links and link loops, named before any work."""
    base = next(p for p in [out, *out.parents, Path(".")] if os.path.isdir(p))
    try:
        name_max = os.pathconf(base, "PC_NAME_MAX")
        path_max = os.pathconf(base, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    shown = str(out) if len(str(out)) < 100 else f"{str(out)[:60]}...({len(str(out)):,} chars)"
    long = [c for c in out.parts if len(os.fsencode(c)) > name_max]
    if long:
        size = len(os.fsencode(long[0]))
        raise ValueError(f"--out {shown}: the name {long[0][:40]}... has {size} bytes, over this "
                         f"file system's {name_max} (NAME_MAX): use a shorter name")
    room = path_max - 1 - len(f"/{CHECKPOINT}.tmp/{STATE}")  # the longest path a run writes
    if len(os.fsencode(os.path.abspath(out))) > room:
        raise ValueError(f"--out {shown}: the path is too long for the files a run writes in it "
                         f"(at most {room} bytes, PATH_MAX {path_max}): use a shorter path")
    for p in [out, *out.parents]:
        if os.path.exists(p):
            break
        if os.path.lexists(p):
            raise ValueError(f"--out {out}: {p} is a symbolic link to a missing target or a "
                             "link loop: fix or remove the link, or pick another --out")


@contextlib.contextmanager
def write_errors(out: Path, resume: str) -> Iterator[None]:
    """An OSError while writing into out (disk full, no permission) as a ValueError naming the
    file, what survived and the command `resume` that continues once the cause is fixed."""
    try:
        yield
    except OSError as e:
        step = last_checkpoint(out)
        if (out / ".publish").is_dir():
            kept = f"the results are complete in {out / '.publish'}; '{resume}' moves them in"
        elif step is not None:
            kept = (f"the last checkpoint (step {step:,}) in {out / CHECKPOINT} is intact: "
                    f"continue with '{resume}'")
        else:
            kept = "no checkpoint was written: run the same command again"
        fix = ("free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
               "make it writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
               "fix the cause")
        raise ValueError(f"cannot write {e.filename or out} ({e.strerror or e}); {kept} once you "
                         f"{fix}") from None
