"""make results: a method × task × seed grid, one training process per cell, then the report.

    python -m study.grid                # SST-2, CoLA: lora fim fw da fim+da, seeds 0-4, grid5/
    python -m study.grid --data-root ../shared/data/glue --tasks sst2 cola --peers peft-lora
    python -m study.grid --budget params --scores kfac random --dry-run
    python -m study.grid --root other/cells -- --steps 100     # train.py flags after '--'
    python -m study.grid --select-lr --tasks sst2 cola --methods lora fim   # then the grid

Recipe: train.py --model minilm --group-by-length (length-grouped batches, HF Trainer's), each
method at the lr --select-lr chose in <root>/../lr/ (chosen.json) when there is one.
"""

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import runfolder
import train
from data import glue
from models import is_decoder
from study import report
from study.report import CELLS, LRS, METHODS, PEERS, RECIPE, SCORES, bounded, folder, lr_folder

GLUE = Path("../shared/data/glue")
OURS = ("efim", "variance", "per-example")  # train.py's scores; the rest run in study.peers
GRID_OWNED = ("--task", "--data-dir", "--seed", "--out", "--method", "--resume", "--overwrite",
              "--threads")
RECIPE_KEYS = ("model", "r", "alpha", "rslora", "dropout", "targets", "steps", "epochs",
               "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "max_len", "max_train",
               "max_eval", "grad_accum", "group_by_length", "eval_fraction")  # every cell shares
SELECT = ["--eval-fraction", "0.1"]  # --select-lr evaluates on a slice of train.tsv, never dev


def method_flags(method: str) -> list[str]:
    """train.py's flags of a grid method.
    method_flags("fim-per-example-params") -> [--method fim --per-example --budget params]"""
    base, _, score = method.removesuffix("-params").partition("-")
    flags = ["--method", base] + (["--per-example"] if score == "per-example" else
                                  ["--score", score] if score else [])
    return flags + (["--budget", "params"] if method.endswith("-params") else [])


def by_peers(method: str) -> bool:
    """Whether study.peers runs this cell: a peer, or a score outside train.py's."""
    return method in PEERS or method in {report.score_method(s) for s in SCORES if s not in OURS}


def recipe(extra: list[str]) -> list[str]:
    """report.RECIPE, length-grouped unless '--' picks a decoder (prompts are not grouped)."""
    model = next((v for f, v in zip(extra, extra[1:]) if f == "--model"), RECIPE[1])
    return [*RECIPE, *([] if is_decoder(model) else [report.GROUPED])]


def cell_command(task: str, method: str, seed: int, data_dir: Path, out: Path, threads: int,
                 resume: bool, extra: list[str] = ()) -> list[str]:
    """One cell's command: the recipe, or with `resume` its --resume from out's checkpoint."""
    peer = by_peers(method)
    head = [sys.executable, *(["-m", "study.peers", method, "--"] if peer else ["train.py"])]
    if resume:
        return [*head, "--resume", str(out), "--threads", str(threads)]
    return [*head, *(["--method", "lora"] if peer else method_flags(method)), *recipe(extra),
            "--task", task, "--data-dir", str(data_dir), "--seed", str(seed),
            "--threads", str(threads), "--log-every", "100", "--out", str(out), *extra]


def missing(method: str) -> str | None:
    """Why a peer cannot run here (a package is not installed), or None."""
    gone = [p for p in ("transformers", "peft") if importlib.util.find_spec(p) is None]
    return f"{' and '.join(gone)} not installed" if gone and method in PEERS else None


def run_cell(cmd: list[str], log: Path) -> int:
    """Run one cell, output appended to log; terminated if the grid stops for any reason."""
    print(" ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the cell got it too (one process group): it checkpoints
            proc.wait()
            raise
        finally:
            if proc.poll() is None:  # SIGTERM: train.py checkpoints as on Ctrl-C
                proc.terminate()
                proc.wait()


def run_grid(cells: list[tuple[str, str, int]], data_dirs: dict[str, Path], root: Path,
             threads: int, run=run_cell, extra: list[str] = (), name=folder) -> dict[str, list]:
    """Run every (task, method, seed) cell without results.json in root/task/name(method, seed),
    resuming one with a checkpoint. Returns the cells by outcome: done, ran, resumed, failed,
    missing, busy (its folder locked by another grid's trainer)."""
    outcome: dict = {k: [] for k in ("done", "ran", "resumed", "failed", "missing", "busy")}
    for cell in cells:
        task, method, seed = cell
        out = root / task / name(method, seed)
        if (out / "results.json").exists() or missing(method):
            outcome["done" if (out / "results.json").exists() else "missing"].append(cell)
            continue
        try:  # a live owner's folder is left alone: no refusal appended to its train.log
            with runfolder.lock(out):
                pass
        except ValueError as e:
            if "is in use by pid" in str(e):
                print(f"cell {task} {out.name} busy: {e}")
                outcome["busy"].append(cell)
                continue
        resume = (out / runfolder.CHECKPOINT).exists()  # the checkpoint: a file or a folder
        log, t0 = out / "train.log", time.time()
        start = log.stat().st_size if log.is_file() else 0
        code = run(cell_command(*cell, data_dirs[task], out, threads, resume, extra), log)
        if code == 0 and (out / "results.json").exists():
            commit = subprocess.run(["git", "describe", "--always", "--dirty"],
                                    capture_output=True, text=True).stdout.strip() or None
            runfolder.write_json(out / "run.json", {"commit": commit, **train.environment(),
                                                    "wall_seconds": time.time() - t0})
            outcome["resumed" if resume else "ran"].append(cell)
        else:  # train.py's lock refusal after `start` (an owner that began just now): busy
            busy = code and log.is_file() and b"is in use by pid" in log.read_bytes()[start:]
            print(f"cell {task} {out.name} {'busy' if busy else 'failed'} (exit {code}): see {log}")
            outcome["busy" if busy else "failed"].append(cell)
    return outcome


def check_grid(a: argparse.Namespace, extra: list[str]) -> tuple[dict[str, Path],
                                                                  argparse.Namespace]:
    """({task: data folder}, the cells' train.py arguments), or ValueError naming the fix."""
    if a.root.exists() and not a.root.is_dir():
        raise ValueError(f"--root {a.root} is a file: pass the cells' folder")
    if not a.data_root.is_dir():
        raise ValueError(f"--data-root {a.data_root}: no such folder; pass the folder that "
                         "holds the GLUE task folders (SST-2, CoLA, ...)")
    data_dirs = {t: a.data_root / glue.TASKS[t].folder for t in dict.fromkeys(a.tasks)}
    for name in ["README.md", *(f"ranks_{t}.svg" for t in data_dirs)]:  # the report's, at the
        report.check_ours(a.root / name)  # end: a user's file there is named before any training
    absent = [f"{d.name}/train.tsv" for d in data_dirs.values() if not (d / "train.tsv").is_file()]
    if absent and not a.dry_run:
        raise ValueError(f"--data-root {a.data_root} holds no {', '.join(absent)}: pass the "
                         "folder of the GLUE download, or narrow --tasks")
    if owned := [f for f in extra if f.split("=")[0] in GRID_OWNED]:
        raise ValueError(f"after '--': {' '.join(owned)} is set by the grid for each cell; use "
                         "--tasks, --data-root, --seeds, --methods, --root or --threads instead")
    task, data = next(iter(data_dirs.items()))
    argv = [*recipe(extra), "--task", task, "--data-dir", str(data), "--out",
            str(a.root / ".unwritten"), *extra]
    try:  # the cells' arguments, checked once here rather than in every cell
        from study.peers import peer_args
        args = peer_args(argv, "peft-adalora" in a.peers) if a.peers else train.parse_args(argv)
    except SystemExit:  # argparse printed the unknown or malformed flag
        raise ValueError(f"after '--': {' '.join(extra)} is not a valid train.py argument list "
                         f"(see {train.command('train.py', '--help')})") from None
    except ValueError as e:
        raise ValueError(f"after '--': {e}") from None
    return data_dirs, args


def check_recipe(cells: list, root: Path, args: argparse.Namespace, name=folder,
                 lr: float | None = None) -> None:
    """ValueError if a finished cell (which the grid skips) was trained with another recipe or
    another lr than `lr` (None: args.lr)."""
    for task, method, seed in cells:
        path = root / task / name(method, seed) / "results.json"
        saved = report.read_result(path).get("args") or {} if path.exists() else {}
        if "lr" in saved and "group_by_length" not in saved:  # older: GLUE evaluated on dev
            saved |= {"group_by_length": False, "eval_fraction": None}
        want = {**vars(args), "lr": lr or args.lr}
        diff = [f"--{k.replace('_', '-')} {saved[k]} there, {want[k]} here"
                for k in RECIPE_KEYS if k in saved and saved[k] != want[k]
                and not (k == "steps" and args.epochs)]
        if diff:
            raise ValueError(f"{path.parent} was trained with another recipe ({'; '.join(diff)})"
                             ": give this recipe its own --root")


def plan(a: argparse.Namespace, tasks: list[str], methods: list[str], extra: list[str],
         chosen: dict) -> list[tuple]:
    """(root, folder name, train.py flags, cells, lr or None) per run of cells sharing flags:
    with --select-lr one per task, method and lr in LRS, seed 0, into <root>/../lr; else one per
    task and method, at its chosen lr when there is one (None: the recipe's)."""
    if a.select_lr:
        return [(a.root.parent / "lr", lambda m, s, lr=lr: lr_folder(m, lr),
                 [*extra, *SELECT, "--lr", f"{lr:g}"], [(t, m, 0)], lr)
                for t in tasks for m in methods for lr in LRS]
    return [(a.root, folder, [*extra, *(["--lr", f"{lr:g}"] if lr else [])],
             [(t, m, s) for s in dict.fromkeys(a.seeds)], lr)
            for t in tasks for m in methods for lr in [chosen.get(t, {}).get(m)]]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog=__doc__.strip().split("\n\n")[-1])
    p.add_argument("--data-root", type=Path, default=GLUE, help="the GLUE download")
    p.add_argument("--tasks", nargs="+", default=["sst2", "cola"], choices=glue.TASKS)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=bounded(0, 2**32 - 1),  # numpy's seed range
                   default=[0, 1, 2, 3, 4])
    p.add_argument("--peers", nargs="*", default=[], choices=PEERS)
    p.add_argument("--budget", choices=("ranks", "params"), default="ranks",
                   help="params: also fim and fim+da at an equal parameter budget")
    p.add_argument("--scores", nargs="+", default=[], choices=SCORES,
                   help="also each score at the parameter budget (fim-S-params)")
    p.add_argument("--root", type=Path, default=CELLS, help="the cells' folder")
    p.add_argument("--threads", type=bounded(0, 1024), default=1, help="CPU threads per cell")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and rewrite the report, train nothing")
    p.add_argument("--select-lr", action="store_true", help=f"seed 0 at each lr in {LRS} on "
                   "10 %% of train.tsv into <root>/../lr/ and its chosen.json, not the grid")
    a = p.parse_args(argv[:len(argv) - len(extra) - ("--" in argv)])
    if a.select_lr and (own := [f for f in extra if f.split("=")[0] in ("--lr", SELECT[0])]):
        raise ValueError(f"after '--': {' '.join(own)} is set by --select-lr for each cell "
                         f"(lr {' '.join(map(str, LRS))}, {' '.join(SELECT)}): drop it")
    data_dirs, cell_args = check_grid(a, [*extra, *SELECT * a.select_lr])
    methods = [*a.methods, *(f"{m}-params" for m in ("fim", "fim+da")
                             if a.budget == "params" and m in a.methods)]
    methods += [m for m in map(report.score_method, a.scores) if m not in methods]
    if not methods and not a.peers:
        raise ValueError("--methods given empty and no --scores or --peers: nothing to run; "
                         f"name methods ({' '.join(METHODS)}), scores or peers")
    lr_root = a.root.parent / "lr"
    user_lr = any(f.split("=")[0] == "--lr" for f in extra)  # the user's lr wins
    chosen = {} if user_lr else report.chosen_lrs(report.lr_results(lr_root))
    plans = plan(a, list(data_dirs), [*methods, *a.peers], extra, chosen)
    for root, name, _, cells, lr in plans:
        check_recipe(cells, root, cell_args, name, lr)
    got = "; ".join(f"{t} {m} {lr:g}" for t, ms in chosen.items() for m, lr in ms.items())
    if not a.select_lr:
        print(f"lr: {got} (chosen in {lr_root}); the rest {cell_args.lr:g}" if got else
              f"lr: {cell_args.lr:g} for every method")
    outs = [(m, root / t / name(m, s)) for root, name, _, cells, _ in plans for t, m, s in cells]
    todo = [out for m, out in outs if not missing(m) and not (out / "results.json").exists()]
    print(f"{'lr selection' if a.select_lr else 'grid'}: {len(data_dirs)} task(s) "
          f"({', '.join(data_dirs)}) x {len(methods) + len(a.peers)} methods x "
          f"{f'{len(LRS)} lrs' if a.select_lr else f'{len(dict.fromkeys(a.seeds))} seeds'} = "
          f"{len(outs)} cells; to run {len(todo)}:", flush=True)
    print("".join(f"  {out}\n" for out in todo) + "".join(
        f"  {peer}: {missing(peer)}, left blank\n" for peer in filter(missing, a.peers)), end="")
    if not a.dry_run and todo:
        outcome: dict = {}
        for root, name, flags, cells, _ in plans:
            for k, v in run_grid(cells, data_dirs, root, a.threads, extra=flags,
                                 name=name).items():
                outcome[k] = outcome.get(k, []) + v
        print(", ".join(f"{k} {len(v)}" for k, v in outcome.items()))
    if a.select_lr and not a.dry_run:
        chosen = report.chosen_lrs(report.lr_results(lr_root))
        runfolder.write_json(lr_root / "chosen.json", chosen)
        print(f"wrote {lr_root / 'chosen.json'}: {json.dumps(chosen)}")
    return report.write_report(a.root)


RESUME = ("finished cells are kept and an interrupted one resumes from its checkpoint; run the "
          "same command again to go on")


def on_sigterm(signum: int, frame) -> None:
    """`kill <grid>` reaches the grid alone, not its cell: exiting runs run_cell's finally, which
    hands the cell one SIGTERM (train.py checkpoints on it as on Ctrl-C) and waits for it."""
    print(f"stopped (SIGTERM): {RESUME}", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # the cell checkpointed on the same Ctrl-C
        print(f"interrupted: {RESUME}", file=sys.stderr)
        sys.exit(130)
