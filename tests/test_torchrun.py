"""torchrun: 2 gloo processes train one run. Both ranks allocate the same ranks, only rank 0
writes, and the result equals one process on the same global batches within float tolerance,
also where the split is uneven: 37 training rows in batches of 8 end each epoch with 5 rows (3/2
across the ranks; with --grad-accum 2 inside FW-LoRA's warm-up), LoRA-DA's 3 calibration batches
go 2/1, and FIM-LoRA's one batch of calibration leaves rank 1 none.

Oracle: the same command in one process. Run: .venv/bin/python -m pytest tests/test_torchrun.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SST2

from lora import read_safetensors

# the decoder has no dropout, whose masks no sharding could reproduce: one process and two see
# the same function of the same global batches
ARGS = ["--model", "tiny-llama", "--task", "sst2", "--data-dir", str(SST2), "--max-train", "37",
        "--max-eval", "32", "--steps", "6", "--batch-size", "8", "--log-every", "2",
        "--threads", "1"]
FAST = {"fw": ["--fw-warmup", "3", "--grad-accum", "2", "--lr", "1e-2"],  # DDP syncs once a step
        "fim+da": ["--calib-batches", "1", "--da-samples", "20"]}  # rank 1: no FIM batch


def torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")
@pytest.mark.parametrize("method", ["fw", "fim+da"])
def test_two_gloo_processes_match_one_process(tmp_path, method):
    import train
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [*ARGS, "--method", method, *FAST[method]]
    r1 = train.main([*argv, "--out", str(one)])
    run2 = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node", "2", "train.py",
                           *argv, "--out", str(two)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert run2.returncode == 0, run2.stderr[-3000:]
    assert run2.stdout.count("seed: 0") == 1  # rank 1 prints nothing
    r2 = json.loads((two / "results.json").read_text())
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["ranks"] == r1["ranks"]  # rank 0 and rank 1 allocated alike (DDP would fail else)
    # LoRA-DA's ill-conditioned Z (below) moves the losses by ~1e-4 too
    torch.testing.assert_close(torch.tensor(r2["train_loss"]), torch.tensor(r1["train_loss"]),
                               rtol=1e-3 if "da" in method else 1e-4, atol=1e-6)
    if method == "fw":  # the warm-up Fisher is the norm of the gradient DDP applies
        for name, v in r1["fw"]["importances"].items():
            assert r2["fw"]["importances"][name] == pytest.approx(v, rel=1e-4), name
    if "fim" in method:
        for name, v in r1["fim"]["scores"].items():
            torch.testing.assert_close(torch.tensor(r2["fim"]["scores"][name]), torch.tensor(v),
                                       rtol=1e-4, atol=1e-12, msg=name)
    if "da" in method:  # the same examples; Z (d_in², from 20 examples) is ill-conditioned, so
        # Ω's near-equal small eigenvalues turn their vectors under float32 sums in another order:
        # B is compared through the losses above, σ = ‖Δ*‖₂ here
        assert r2["da"]["n_samples"] == r1["da"]["n_samples"] == 20
        for name, v in r1["da"]["matrices"].items():
            assert r2["da"]["matrices"][name]["sigma"] == pytest.approx(v["sigma"], rel=1e-3)
        return
    a1, _ = read_safetensors(one / "adapter" / "adapter_model.safetensors")
    a2, _ = read_safetensors(two / "adapter" / "adapter_model.safetensors")
    for k in a1:  # Adam's normalised steps carry the float noise of the sums
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-3, atol=5e-5, msg=k)


def test_shards_are_disjoint_and_cover_every_batch():
    from data.tasks import shards
    batch = {"input_ids": torch.arange(24).reshape(8, 3), "labels": torch.arange(8),
             "task": "sst2"}
    parts = [next(shards(iter([batch]), k, 4)) for k in range(4)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert all(p["labels"].shape == (2,) and p["task"] == "sst2" for p in parts)
    assert next(shards(iter([batch]), 0, 1)) is batch


def test_uneven_shards_carry_their_weight_and_a_rank_without_rows_is_refused(monkeypatch):
    """5 rows over 2 ranks: 3 and 2, weighted 2·3/5 and 2·2/5 (their means then average to the
    5-row mean); even splits carry no weight. A last batch of 1 row over 2 ranks is refused."""
    from data.tasks import SHARD_WEIGHT, Task, init_distributed, shards
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.arange(5)}
    parts = [next(shards(iter([batch]), k, 2)) for k in range(2)]
    assert [p[SHARD_WEIGHT] for p in parts] == [6 / 5, 4 / 5]
    assert SHARD_WEIGHT not in next(shards(iter([{"x": torch.ones(4)}]), 0, 2))
    task = Task(None, [], None, 33, lambda m, b: b["labels"].float().mean(), None, True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a process group of 2, faked
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    weighted, rank, world = init_distributed(task._replace(n_train=37), torch.device("cpu"), 8)
    losses = [weighted.loss_fn(None, p) for p in parts]
    assert (losses[0] + losses[1]) / 2 == pytest.approx(batch["labels"].float().mean().item())
    assert (rank, world) == (0, 2) and weighted.loss_fn(None, batch) == 2  # whole: unweighted
    with pytest.raises(ValueError, match="last batch of each epoch has 1 rows"):
        init_distributed(task, torch.device("cpu"), 8)
    with pytest.raises(ValueError, match="--batch-size 7 is not divisible by the 2 processes"):
        init_distributed(task, torch.device("cpu"), 7)


def test_torchrun_on_cuda_gives_each_process_its_own_gpu(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) on CUDA, the process with LOCAL_RANK 1 trains on cuda:1
    and makes it current (nccl's device); one process keeps plain `cuda`, --device cpu keeps
    the CPU (gloo), and a LOCAL_RANK with no GPU is refused naming the fix. CUDA is faked: the
    choice, not the GPU, is under test."""
    import train
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.resolve_device("auto") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert train.resolve_device("cpu") == torch.device("cpu") and len(current) == 1
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK 2 but 2 GPU\\(s\\) visible: start torchrun "
                                         "with --nproc-per-node <= 2"):
        train.resolve_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.resolve_device("cuda") == torch.device("cuda") and len(current) == 1


def test_the_stop_vote_is_reduced_on_the_process_groups_device(monkeypatch):
    """agreed()'s tensor lives on the device it is given (the rank's GPU under nccl, which
    rejects CPU tensors); `meta` stands in for the GPU, the fake all_reduce records it."""
    from data.tasks import agreed
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(t, op):
        seen.append(t.device)
        raise Reduced
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        agreed(True, 2, torch.device("meta"))
    assert seen == [torch.device("meta")]
    assert agreed(True, 1, torch.device("meta")) is True and len(seen) == 1
