"""One grid cell with another adapt step: PEFT (peft-lora, peft-eva, peft-adalora) or an
alternative allocation score (fim-kfac-params: study.scores), on train.py's recipe.

    python -m study.peers peft-eva -- --model minilm --task sst2 --data-dir D --out O
    python -m study.peers peft-eva -- --resume O
"""

import argparse
import itertools
import re
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import runfolder
import train
from data.tasks import to_device
from models import is_decoder, model_path
from study.report import PEERS, SCORES, score_method

EVA_RHO = 2.0  # EVA's rank redistribution bound: a matrix gets at most rho * r
EVA_BATCHES = 32  # calibration batches handed to PEFT's EVA, which cycles them to convergence
ADALORA_INIT = 1.5  # peft-adalora starts at init_r = 1.5 r per matrix and prunes to r


def peer_versions() -> dict[str, str]:
    return {m: version(m) for m in ("transformers", "peft")}


class HFCall(nn.Module):
    """train.py calls model(input_ids, attention_mask, token_type_ids) and reads logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


def hf_twin(task, args, device, rng, config_name: str = "LoraConfig", **config):
    """(our uniformly adapted model, the PEFT model of transformers' BERT with our head): ours
    first, so every random draw (data order, calibration, head) is train.py's."""
    import peft
    import transformers
    ours = train.add_adapters(task, args, device, rng)
    hf = transformers.BertForSequenceClassification.from_pretrained(
        model_path(args.model), num_labels=ours.classifier.out_features)
    hf.classifier.load_state_dict(ours.classifier.state_dict())
    config = getattr(peft, config_name)(
        lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets.split(","),
        modules_to_save=list(task.heads), **config)
    return ours, peft.get_peft_model(hf, config).to(device).train(task.train_mode)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    import peft
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def peft_adapt(task, args, device, rng) -> nn.Module:
    """PEFT LoRA with our head and every lora_A copied from ours: only the code differs."""
    ours, model = hf_twin(task, args, device, rng, r=args.r, use_rslora=args.rslora)
    layers = dict(ours.named_modules())
    with torch.no_grad():
        for n, m in lora_layers(model).items():
            m.lora_A["default"].weight.copy_(layers[n].lora_A)
    return HFCall(model)


def eva_layer_inputs(layer_input, token_index, layer_name) -> torch.Tensor:
    """EVA's SVD rows of one layer: its non-padding tokens, or every row of the pooler's (B, C)
    input; PEFT's default assumes (B, T, C)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.contiguous() if x.ndim == 2 else x[token_index.T.unbind()]


def eva_adapt(record: dict):
    """PEFT's EVA (arXiv:2410.07170) on train.py's calibration stream: A from the incremental
    SVD of the target layers' inputs, ranks within ρ·r, B = 0; time and ranks into `record`."""
    def adapt(task, args, device, rng) -> nn.Module:
        import peft
        _, model = hf_twin(task, args, device, rng, r=args.r, init_lora_weights="eva",
                           eva_config=peft.EvaConfig(rho=EVA_RHO, use_label_mask=False))
        calib = [to_device(b, device) for b in  # PEFT cycles them: it needs a sized iterable
                 itertools.islice(task.train_batches(rng["calib"]), EVA_BATCHES)]
        t0 = time.perf_counter()
        peft.initialize_lora_eva_weights(model, calib, show_progress_bar=False,
                                         prepare_layer_inputs_fn=eva_layer_inputs)
        record.update(seconds=time.perf_counter() - t0, eva_batches=len(calib),
                      ranks={n: m.r["default"] for n, m in lora_layers(model).items()})
        return HFCall(model)
    return adapt


def adalora_train(args: argparse.Namespace) -> dict:
    """train.py's recipe on PEFT AdaLoRA (arXiv:2303.10512) at the same final budget: init_r =
    1.5 r pruned to r between 10 % and 80 % of the steps, every 10 steps. Its own loop, because
    update_and_allocate must run between optimizer.step and zero_grad; no checkpoints."""
    out = Path(args.out)
    with runfolder.lock(out):  # one owner of --out, as train.run's cells
        runfolder.check_out(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        rng, device = train.random_streams(args.seed), train.resolve_device(args.device)
        task = train.build_task(args, device, rng)
        _, model = hf_twin(task, args, device, rng, "AdaLoraConfig", target_r=args.r,
                           init_r=round(ADALORA_INIT * args.r), tinit=args.steps // 10,
                           tfinal=args.steps // 5, deltaT=10, total_step=args.steps)
        opt, sched = train.make_optimizer(model, args)
        trainable = [p for p in model.parameters() if p.requires_grad]
        batches, losses, seconds = task.train_batches(rng["data"]), [], 0.0
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            b = to_device(next(batches), device)
            keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
            res = model(**{k: b[k] for k in keys})
            res.loss.backward()  # PEFT's: cross-entropy + its orthogonality term
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            opt.step()
            model.base_model.update_and_allocate(step)
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(F.cross_entropy(res.logits.detach().float(), b["labels"]).item())
            seconds += time.perf_counter() - t0
            if step % args.log_every == 0 or step == args.steps:
                print(f"step {step:,}/{args.steps:,} | loss {statistics.mean(losses[-50:]):.4g}"
                      f" | {seconds / step:.3f} s/step", flush=True)
        config, env = model.peft_config["default"], train.environment(device)
        results = {
            "args": vars(args), "seed": args.seed, "device": str(device), **env,
            "metrics": task.evaluate(HFCall(model)), "peer": "peft-adalora",
            "versions": env["versions"] | peer_versions(), "train_loss": losses,
            "trainable_parameters": train.n_params(model),
            "seconds": {"calibration": 0.0, "training": seconds, "per_step": seconds / args.steps},
            "ranks": {re.sub(r"^base_model\.model\.|\.lora_E(\.default)?$", "", n): int(sum(m))
                      for n, m in (config.rank_pattern or {}).items()}}
        print(f"eval: {results['metrics']}")
        out.mkdir(parents=True, exist_ok=True)
        runfolder.write_json(out / "results.json", results)
    return results


def peer_args(argv: list[str], adalora: bool = False) -> argparse.Namespace:
    """train.py's arguments of a peer cell, refused before any work unless a BERT encoder on a
    GLUE task (transformers' BertForSequenceClassification); peft-adalora: no --grad-accum."""
    args = train.parse_args(argv)
    if args.task == "planted" or args.model == "tiny" or is_decoder(args.model):
        raise ValueError(f"--model {args.model} --task {args.task}: the peers (transformers + "
                         "PEFT) train a BERT encoder on a GLUE task; use --model minilm (or an "
                         "HF BERT folder) with --task and --data-dir")
    if adalora and args.grad_accum > 1:  # its own loop: one batch per AdaLoRA step
        raise ValueError(f"--grad-accum {args.grad_accum}: peft-adalora trains one batch per "
                         "step; drop --grad-accum (or raise --batch-size instead)")
    return args


def cell(name: str, argv: list[str]) -> dict:
    """One cell: train.py's arguments `argv` with the adapt step `name`, a peer or an
    alternative score's grid method; its name, ranks and time are saved by train.run."""
    if name == "peft-adalora":
        if "--resume" in argv:
            raise ValueError("--resume: peft-adalora cells do not checkpoint; run the cell again "
                             "without --resume (and with --overwrite if its folder exists)")
        return adalora_train(peer_args(argv, adalora=True))
    record: dict = {}
    if name in PEERS:
        args = peer_args(argv)
        adapt = peft_adapt if name == "peft-lora" else eva_adapt(record)
        if name == "peft-eva" and args.batch_size < EVA_RHO * args.r:  # PEFT would cycle forever
            raise ValueError(f"--batch-size {args.batch_size} < rho * r = {EVA_RHO * args.r:g}: "
                             "EVA's SVD of the pooler (one row per example) needs that many rows "
                             "per batch and never converges with fewer; raise --batch-size or "
                             "lower --r")
    else:
        from study.scores import score_adapt
        args = train.parse_args(argv)
        adapt = score_adapt(next(s for s in SCORES if score_method(s) == name), "params",
                            args.r_max, record)

    def finish(res: dict) -> None:
        res["peer" if name in PEERS else "score"] = name
        if name in PEERS:
            res["versions"] = {**res.get("versions", {}), **peer_versions()}
        if record:
            res["seconds"]["calibration"], res["ranks"] = record["seconds"], record["ranks"]
            res |= {"eva_batches": record["eva_batches"]} if "eva_batches" in record else {}
    try:
        return train.run(args, adapt, finish)
    except train.Interrupted as e:  # its resume command is this one, not train.py's
        raise train.Interrupted(str(e).replace(
            train.command("train.py", "--resume"),
            train.command("-m", "study.peers", name, "--", "--resume"))) from None


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=[*PEERS, *(score_method(s) for s in SCORES[3:])],
                   help="the adapt step; train.py's flags follow '--'")
    return cell(p.parse_args(argv[:len(argv) - len(rest) - ("--" in argv)]).name, rest)


if __name__ == "__main__":
    try:
        main()
    except train.Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
