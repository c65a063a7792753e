"""train.main end to end on the tiny model: finite losses, results JSON with the seed, adapter on
disk, same seed -> same numbers, bad input -> a message and no files.

Run: .venv/bin/python -m pytest tests/test_train.py -q
"""

import contextlib
import json
import sys

import pytest
import torch
from conftest import ROOT, SST2

import runfolder
import train
from lora import add_lora, load_adapter
from models import load_model

QUICK = ["--model", "tiny", "--steps", "6", "--batch-size", "8", "--log-every", "3"]
FAST = {"fim": ["--calib-batches", "2"], "da": ["--da-samples", "16"], "fw": ["--fw-warmup", "3"]}


def quick(method: str) -> list[str]:
    """QUICK and the fast settings of the flags `method` reads (others refuse them)."""
    return QUICK + [f for m, flags in FAST.items() if m in method.split("+") for f in flags]


def run(tmp_path, *extra):
    method = extra[extra.index("--method") + 1] if "--method" in extra else "lora"
    return train.main([*quick(method), "--out", str(tmp_path), *extra])


def test_every_method_runs_on_the_same_batches_and_keeps_the_budget(tmp_path, monkeypatch):
    """Each method on planted (seed 3): finite losses, results JSON with the seed, the adapter on
    disk, the budget r x matrices kept. Calibration (fim, da) and re-initialisation draw from
    their own generators, so every method trains on the same batches (recorded as drawn); fim
    computes the Fisher scores once (no planted-recovery printout); LoRA-DA moves the model away
    from B = 0 before step 0, and its loss_ratio still divides by the loss at B = 0, the same for
    every method."""
    import fimlora
    from data import planted
    seen, draw, calls, scores = [], planted.random_batch, [], fimlora.fisher_scores
    monkeypatch.setattr(planted, "random_batch",
                        lambda *a, **k: seen.append(draw(*a, **k)) or seen[-1])
    monkeypatch.setattr(fimlora, "fisher_scores", lambda *a, **k: calls.append(1) or
                        scores(*a, **k))
    order, res = {}, {}
    for method in train.METHODS:
        seen.clear()
        calls.clear()
        out = tmp_path / method.replace("+", "_")
        res[method] = r = run(out, "--method", method, "--seed", "3")
        order[method] = [b["input_ids"].tolist() for b in seen[-6:]]  # the 6 training steps
        saved = json.loads((out / "results.json").read_text())
        assert saved["seed"] == 3 and saved["args"]["method"] == method
        assert all(x == x and abs(x) < 1e6 for x in r["train_loss"]) and len(r["train_loss"]) == 6
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert sum(r["ranks"].values()) == 8 * len(r["ranks"])  # the budget r x matrices
        assert len(calls) == (1 if method.startswith("fim") else 0)
        assert "planted_recovery" not in saved and ("fim" in saved) == ("fim" in method)
        assert "scores" in saved.get("fim", {"scores": "not fim"})
    assert all(o == order["lora"] for o in order.values())
    lora, da = res["lora"], res["da"]
    assert da["loss_at_B0"] == lora["loss_at_B0"] == lora["eval_history"][0]["loss"]
    assert da["eval_history"][0]["loss"] != da["loss_at_B0"]  # the init moved it
    assert da["metrics"]["loss_ratio"] == da["metrics"]["loss"] / da["loss_at_B0"]
    again, other = (run(tmp_path / f"fim{s}", "--method", "fim", "--seed", s) for s in "32")
    assert again["train_loss"] == res["fim"]["train_loss"] and again["ranks"] == res["fim"]["ranks"]
    assert again["metrics"] == res["fim"]["metrics"] and other["train_loss"] != again["train_loss"]


def test_saved_adapter_reloads_the_trained_adapter(tmp_path):
    """load_adapter restores the trained ranks and tensors: the reloaded model's output equals
    one built from the saved tensors by hand, and differs from the base model's."""
    from lora import load_lora_state_dict, lora_layers, read_safetensors, resize_lora
    res = run(tmp_path, "--method", "fim", "--seed", "0")
    saved, _ = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")

    def fresh():
        model, _ = load_model("tiny", num_labels=None, generator=torch.Generator().manual_seed(0))
        add_lora(model, res["args"]["targets"].split(","), r=8, alpha=16)
        return model.eval()
    loaded, by_hand, base = fresh(), fresh(), fresh()
    load_adapter(tmp_path / "adapter", loaded)
    for name, layer in lora_layers(by_hand).items():
        resize_lora(layer, res["ranks"][name], alpha=res["alphas"][name])
    load_lora_state_dict(by_hand, saved)
    assert {n: m.r for n, m in lora_layers(loaded).items()} == res["ranks"]
    assert any(bool(m.lora_B.any()) for m in lora_layers(loaded).values())
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want, plain = (m(ids, torch.ones_like(ids))[0] for m in (loaded, by_hand, base))
    assert torch.equal(out, want) and not torch.allclose(out, plain)


@pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")
def test_glue_sst2_tiny_runs(tmp_path):
    res = run(tmp_path, "--task", "sst2", "--data-dir", str(SST2), "--max-train", "64",
              "--max-eval", "32", "--method", "lora")
    assert 0.0 <= res["metrics"]["accuracy"] <= 1.0
    from lora import read_safetensors
    saved, _ = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "classifier.weight" in saved  # the head is trained and saved with the adapter
    peft_cfg = json.loads((tmp_path / "adapter_peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("bad,match", [
    (["--r", "0"], "--r 0"),
    (["--task", "sst2"], "--data-dir"),
    (["--r-min", "9"], "--r-min 9"),
    (["--warmup", "1.5"], "--warmup 1.5"),
])
def test_bad_arguments_fail_before_any_write(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train.main([*quick("fim"), "--method", "fim", "--out", str(tmp_path / "o"), *bad])
    assert not (tmp_path / "o").exists()


def test_task_defaults_planted_lr_and_steps_let_the_oracle_converge(tmp_path):
    """The planted task trains 600 steps at lr 5e-3 (its discrimination criterion needs a
    converged oracle, README); GLUE keeps the reference recipe; an explicit value wins."""
    planted = train.parse_args(["--out", str(tmp_path / "p")])
    assert (planted.lr, planted.steps) == (5e-3, 600)
    glue = train.parse_args(["--task", "sst2", "--data-dir", str(tmp_path), "--out",
                             str(tmp_path / "g")])
    assert (glue.lr, glue.steps) == (5e-4, 1000)
    mine = train.parse_args(["--lr", "1e-3", "--steps", "7", "--out", str(tmp_path / "m")])
    assert (mine.lr, mine.steps) == (1e-3, 7)


def test_fw_track_every_k_tracks_warm_up_steps_1_1pk_and_counts_them_with_beta_to_the_k(
        tmp_path, monkeypatch):
    """--fw-track-every 2 with a 5-step warm-up: ‖∂L/∂W‖² is tracked at steps 1, 3, 5 only, the
    EMA counts them 1, 2, 3 with factor β², and the untracked warm-up steps train plainly."""
    import fimlora
    calls, real = [], fimlora.fw_update
    monkeypatch.setattr(fimlora, "fw_update", lambda ema, sq, step, beta=fimlora.FW_BETA: (
        calls.append((step, beta)) or real(ema, sq, step, beta)))
    res = train.main(["--method", "fw", "--steps", "10", "--fw-warmup", "5", "--fw-track-every",
                      "2", "--batch-size", "4", "--threads", "1", "--out", str(tmp_path / "o")])
    assert calls == [(1, fimlora.FW_BETA ** 2), (2, fimlora.FW_BETA ** 2),
                     (3, fimlora.FW_BETA ** 2)]
    assert len(res["train_loss"]) >= 1 and res["args"]["fw_track_every"] == 2


def _train_on(tmp_path, stream: list[dict], method: str, batch: int, accum: int, steps: int = 4):
    """train.train_loop on the planted task with the training batches replaced by `stream`;
    returns (trainable tensors, the loop's result)."""
    from data.tasks import planted_task
    args = train.parse_args(["--method", method, "--steps", str(steps), "--batch-size",
                             str(batch), "--grad-accum", str(accum), "--lr", "1e-2",
                             "--out", str(tmp_path), *(["--fw-warmup", "2"] * (method == "fw"))])
    tmp_path.mkdir(parents=True)  # prepare_out's work: the loop logs into --out
    rng = train.random_streams(0)
    task = planted_task(args, torch.device("cpu"), rng)
    task = task._replace(train_batches=lambda g: iter(stream))
    model = train.add_adapters(task, args, torch.device("cpu"), rng)
    res = train.train_loop(model, task, args, rng, {}, None, (0, 1))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, res


@pytest.mark.parametrize("method", ["lora", "fw"])
@pytest.mark.parametrize("sizes", [(4, 4), (3, 5)])
def test_grad_accum_gives_the_update_of_one_big_batch(tmp_path, method, sizes):
    """--grad-accum 2 on micro-batches of n_1 and n_2 examples vs one batch of their n_1 + n_2
    rows, same data: after 4 AdamW steps the adapters, the logged losses and (fw) the
    importances of the warm-up Fisher agree up to float rounding. Micro-batch losses are
    weighted by their example counts, so unequal micro-batches (3 + 5) are exact too (an
    unweighted mean of the two micro-batch means would not be); fw_track sees the norm of the
    summed gradient, not the sum of the micro-batch norms. Oracle: the big-batch run."""
    from data.planted import random_batch
    g = torch.Generator().manual_seed(7)
    micro = [random_batch(1000, n, 12, g) for _ in range(4) for n in sizes]
    big = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(micro[::2], micro[1::2])]
    p_acc, r_acc = _train_on(tmp_path / "acc", micro, method, max(sizes), 2)
    p_big, r_big = _train_on(tmp_path / "big", big, method, sum(sizes), 1)
    torch.testing.assert_close(torch.tensor(r_acc["losses"]), torch.tensor(r_big["losses"]),
                               rtol=1e-5, atol=0)
    if method == "fw":
        imp_acc, imp_big = r_acc["fw"]["importances"], r_big["fw"]["importances"]
        for n in imp_big:
            assert imp_acc[n] == pytest.approx(imp_big[n], rel=1e-4), n
    for n in p_big:
        torch.testing.assert_close(p_acc[n], p_big[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(bool(p.any()) for n, p in p_big.items() if "lora_B" in n)  # it trained


def test_grad_accum_1_is_the_plain_loop_bit_for_bit(tmp_path):
    """The default --grad-accum 1 trains exactly as the loop without accumulation did: one
    batch, loss.backward(), clip, AdamW, schedule per step. Oracle: that loop, written out."""
    from data.planted import random_batch
    g = torch.Generator().manual_seed(3)
    stream = [random_batch(1000, 8, 12, g) for _ in range(4)]
    ours, _ = _train_on(tmp_path / "o", stream, "lora", 8, 1)
    from data.tasks import planted_task
    args = train.parse_args(["--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--out",
                             str(tmp_path / "r")])
    rng = train.random_streams(0)
    task = planted_task(args, torch.device("cpu"), rng)
    model = train.add_adapters(task, args, torch.device("cpu"), rng)
    opt, sched = train.make_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for batch in stream:
        task.loss_fn(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ours[n]), n


def test_grad_accum_consumes_n_batches_per_step_and_scales_epochs(tmp_path, monkeypatch):
    """Each optimizer step draws --grad-accum batches from the data stream, one loss is logged
    per step, and --epochs counts examples: steps = ⌈epochs · n_train / (batch · N)⌉."""
    from data import planted
    seen, draw = [], planted.random_batch
    monkeypatch.setattr(planted, "random_batch",
                        lambda *a, **k: seen.append(draw(*a, **k)) or seen[-1])
    counts = []
    for n in (1, 3):
        seen.clear()
        res = run(tmp_path / f"a{n}", "--grad-accum", str(n))
        counts.append(len(seen))
        assert len(res["train_loss"]) == 6
    assert counts[1] - counts[0] == 6 * 2  # 6 steps, 2 more batches each
    with pytest.raises(ValueError, match="--grad-accum 0"):
        run(tmp_path / "b", "--grad-accum", "0")
    args = train.parse_args(["--task", "sst2", "--data-dir", str(tmp_path), "--epochs", "1",
                             "--batch-size", "4", "--grad-accum", "2", "--out",
                             str(tmp_path / "c")])
    task = train.Task(None, [], None, 20, None, None, True)
    from data import tasks
    monkeypatch.setattr(tasks, "glue_task", lambda *a: task)
    assert train.build_task(args, torch.device("cpu"), {}) is task
    assert train.resolve(args, task).steps == 3 and args.steps is None  # ⌈20 / 8⌉, a new args


def test_grad_accum_on_a_decoder_loss_averaged_over_answer_tokens_is_exact():
    """The decoder loss averages each example's answer-token NLL, then the examples
    (data/causal.py), so weighting micro-batches by their examples gives the big batch's
    gradient although the micro-batches have other lengths, paddings and answer-token counts
    (1 to 3 per row). Oracle: the gradient of one batch of all rows, padded to the longest."""
    from data.causal import causal_loss, collate
    from models import load_model
    model, _ = load_model("tiny-llama", generator=torch.Generator().manual_seed(0))
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    lengths, answers = [3, 9, 5, 12, 4, 7, 6], [1, 3, 2, 1, 2, 3, 1]
    rows = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]

    def loss_fn(m, b):
        return causal_loss(m(b["input_ids"], b["attention_mask"]).float(), b)

    def grads(micro):
        for p in model.parameters():
            p.grad = None
        loss = train.micro_backward(model, loss_fn, micro)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    parts = [(0, 2), (2, 7)]  # 2 rows, then 5: unequal sizes and paddings
    micro = [collate(rows[a:b], answers[a:b], 0) for a, b in parts]
    loss_acc, g_acc = grads(micro)
    loss_big, g_big = grads([collate(rows, answers, 0)])
    assert micro[0]["input_ids"].shape[1] != micro[1]["input_ids"].shape[1]
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-5, atol=0)
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-7, msg=n)
def test_help_gives_every_flag_a_help_text_and_its_default_once():
    """--help (issue 18): no flag without help, no default shown twice or as None/False, the
    groups and an examples epilog."""
    parser = train.build_parser()
    fmt = parser._get_formatter()
    for action in parser._actions:
        text = fmt._expand_help(action)  # the text --help prints for it
        assert action.help, action.option_strings
        assert text.count("default") <= 1, (action.option_strings, text)
    out = parser.format_help()
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "(default: 16.0)" in flat and "(default: efim)" in flat  # --alpha, --score
    assert "Fisher methods" in out
    assert f"examples:\n  {train.command('train.py')} --method fim" in out  # runnable as shown


def test_default_out_names_task_model_method_and_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.parse_args(["--model", "tiny-llama", "--method", "fim+da", "--seed", "3"]).out \
        == "runs/planted-tiny-llama-fim_da-s3"
    folder = str(tmp_path / "models" / "my-bert") + "/"  # a path: its folder's name
    assert train.parse_args(["--model", folder]).out == "runs/planted-my-bert-lora-s0"


def test_make_run_succeeds_twice_in_a_row(tmp_path, monkeypatch, capsys):
    """The Makefile's run recipe (made quick), twice into its default --out: the second run
    replaces the first instead of stopping at "holds a finished run"; --compare says what it
    trains."""
    recipe = (ROOT / "Makefile").read_text().split("\nrun:")[1].split("\n")[1].split()
    assert recipe[:2] == ["$(PY)", "train.py"], recipe
    monkeypatch.chdir(tmp_path)
    argv = recipe[2:] + ["--steps", "3", "--batch-size", "4", "--threads", "1",
                         "--calib-batches", "2"]
    first = train.main(argv)
    second = train.main(argv)
    assert first["train_loss"] == second["train_loss"] and "compare" in second
    out = capsys.readouterr().out
    assert "compare: training the uniform twin (3 steps" in out and "oracle twin" in out
    assert (tmp_path / "runs" / "planted-tiny-fim-s0" / "results.json").is_file()


@contextlib.contextmanager
def killed_after_step_5(monkeypatch):
    """The run inside is killed right after logging step 5 (its last checkpoint stays)."""
    real = train.log_step

    def killed(k, *a):
        real(k, *a)
        if k == 5:
            raise RuntimeError("killed")
    monkeypatch.setattr(train, "log_step", killed)
    with pytest.raises(RuntimeError):
        yield
    monkeypatch.setattr(train, "log_step", real)


def test_log_jsonl_has_each_logged_step_and_eval_once_across_a_resume(tmp_path, monkeypatch):
    """<out>/log.jsonl: one line per logged step (step, loss, lr, examples/s, elapsed) and per
    eval; a run killed after step 5 resumes from its step-3 checkpoint without repeating 4, 5."""
    out = tmp_path / "o"
    with killed_after_step_5(monkeypatch):
        run(out, "--log-every", "1", "--save-every", "3")
    train.main(["--resume", str(out)])
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "examples_per_s", "elapsed"} <= set(r) for r in steps)
    assert [(r["step"], sorted(r["eval"])) for r in lines if "eval" in r] == [
        (0, ["loss"]), (6, ["loss", "loss_ratio"])]
    train.main([*QUICK, "--out", str(out), "--overwrite"])  # a fresh run starts a fresh log
    assert len((out / "log.jsonl").read_text().splitlines()) == 4  # eval 0, steps 3 and 6, eval


def test_printed_commands_use_the_running_interpreter(tmp_path, monkeypatch):
    """A message's command runs as printed: "python" only when that is this interpreter."""
    import shlex
    monkeypatch.setattr(runfolder.shutil, "which", lambda name: "/usr/bin/python")
    assert train.command("train.py", "--resume", "a b") == \
        f"{shlex.quote(sys.executable)} train.py --resume 'a b'"
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "checkpoint.pt").write_text("{}")  # an unfinished run: "continue it ..."
    with pytest.raises(ValueError) as e:
        train.parse_args(["--out", str(tmp_path / "o")])
    assert shlex.split(str(e.value).split("'")[1])[:2] == [sys.executable, "train.py"]
    monkeypatch.setattr(runfolder.shutil, "which", lambda name: sys.executable)
    assert train.command("train.py", "--resume", "x") == "python train.py --resume x"


@pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")
def test_calibration_sizes_are_capped_at_one_pass_over_the_data(tmp_path, capsys):
    """--calib-batches / --da-samples beyond the training set are capped (and said so) instead
    of drawing repeated batches into memory; the eval prints a line before it starts."""
    res = train.main([*QUICK, "--task", "sst2", "--data-dir", str(SST2), "--max-train", "16",
                      "--max-eval", "8", "--method", "fim+da", "--calib-batches", "1000000",
                      "--da-samples", "10000000", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "--calib-batches 1,000,000 capped at 2" in out and "--da-samples 10,000,000 capped at" \
        " 16" in out and "evaluating at step 6" in out
    assert (res["args"]["calib_batches"], res["args"]["da_samples"]) == (2, 16)
    assert res["da"]["n_samples"] == 16


def test_args_are_resolved_once_into_a_new_namespace_and_an_epochs_run_resumes(tmp_path,
                                                                               monkeypatch):
    """--epochs gives --steps from the data once, in a new Namespace (train.resolve): the
    parsed args are never mutated, results.json holds the args given plus the resolved ones,
    and a run killed after step 5 resumes bitwise (its saved args hold --steps and --epochs
    both, which --resume refused as "pick one" before). 36 training rows of 40 in batches of 8,
    2 epochs: ⌈72 / 8⌉ = 9 steps."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"w{i} x{i % 3},{'ab'[i % 2]}\n" for i in range(40)))
    argv = ["--data", str(data), "--epochs", "2", "--batch-size", "8", "--save-every", "2",
            "--log-every", "1", "--threads", "1", "--method", "fim", "--calib-batches", "99"]
    args = train.parse_args([*argv, "--out", str(tmp_path / "full")])
    given = dict(vars(args))
    full = train.run(args)
    assert vars(args) == given and args.steps is None and args.calib_batches == 99
    assert (full["args"]["steps"], full["args"]["calib_batches"], full["args"]["epochs"]) == \
        (9, 5, 2.0)  # the calibration capped at one pass: ⌈36 / 8⌉ batches
    with killed_after_step_5(monkeypatch):
        train.main([*argv, "--out", str(tmp_path / "o")])
    resumed = train.main(["--resume", str(tmp_path / "o")])
    assert resumed["train_loss"] == full["train_loss"] and resumed["args"] == full["args"] | {
        "out": str(tmp_path / "o"), "resume": str(tmp_path / "o")}


def test_plants_follow_the_flag(tmp_path, monkeypatch):
    """--plants anywhere reaches data/tasks.py's plant() as reach=inf, the default as the
    Fisher's reach."""
    from data import planted
    plants, real_plant = [], planted.plant
    monkeypatch.setattr(planted, "plant", lambda *a, **k: plants.append(k.get("reach")) or
                        real_plant(*a, **k))
    run(tmp_path / "a", "--steps", "1")
    run(tmp_path / "b", "--plants", "anywhere", "--steps", "1")
    assert plants == [None, float("inf")]
