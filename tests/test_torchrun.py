"""torchrun: 2 gloo processes train one run. Both ranks allocate the same ranks, only rank 0
writes, and the result equals one process on the same global batches within float tolerance,
also where the split is uneven: 37 training rows in batches of 8 end each epoch with 5 rows (3/2
across the ranks, inside FW-LoRA's warm-up), 3 calibration batches go 2/1, and one batch of
calibration leaves rank 1 none.

Oracle: the same command without torchrun. Run: .venv/bin/python -m pytest tests/test_torchrun.py
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
ARGS = ["train.py", "--model", "tiny-llama", "--task", "sst2", "--data-dir", str(SST2),
        "--max-train", "37", "--max-eval", "32", "--steps", "10", "--batch-size", "8",
        "--calib-batches", "3", "--log-every", "2", "--threads", "1", "--fw-warmup", "5"]


def torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")
@pytest.mark.parametrize("method", ["lora", "fim", "fw", "fim+da kfac"])
def test_two_gloo_processes_match_one_process(tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    method, *score = method.split()
    extra = ["--score", *score, "--calib-batches", "1", "--da-samples", "12"] if score else []
    run1 = subprocess.run([sys.executable, *ARGS, "--method", method, *extra, "--out", str(one)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run1.returncode == 0, run1.stderr[-2000:]
    run2 = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node", "2", *ARGS,
                           "--method", method, *extra, "--out", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run2.returncode == 0, run2.stderr[-3000:]
    assert run2.stdout.count("seed: 0") == 1  # rank 1 prints nothing
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["ranks"] == r1["ranks"]  # rank 0 and rank 1 allocated alike (DDP would fail else)
    torch.testing.assert_close(torch.tensor(r2["train_loss"]), torch.tensor(r1["train_loss"]),
                               rtol=1e-4, atol=1e-6)
    if method == "fw":  # the warm-up Fisher is the norm of the gradient DDP applies
        for name, v in r1["fw"]["importances"].items():
            assert r2["fw"]["importances"][name] == pytest.approx(v, rel=1e-4), name
    if "fim" in method:
        for name, v in r1["fim"]["scores"].items():
            torch.testing.assert_close(torch.tensor(r2["fim"]["scores"][name]), torch.tensor(v),
                                       rtol=1e-4, atol=1e-12, msg=name)
    if "da" in method:  # the same examples; Z (d_in², from 12 examples) is ill-conditioned, so
        # Ω's near-equal small eigenvalues turn their vectors under float32 sums in another order:
        # B is compared through the losses above, σ = ‖Δ*‖₂ here
        assert r2["da"]["n_samples"] == r1["da"]["n_samples"] == 12
        for name, v in r1["da"]["matrices"].items():
            assert r2["da"]["matrices"][name]["sigma"] == pytest.approx(v["sigma"], rel=1e-3)
        return
    a1, _ = read_safetensors(one / "adapter" / "adapter_model.safetensors")
    a2, _ = read_safetensors(two / "adapter" / "adapter_model.safetensors")
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-3, atol=1e-5, msg=k)


def test_shards_are_disjoint_and_cover_every_batch():
    import train
    batch = {"input_ids": torch.arange(24).reshape(8, 3), "labels": torch.arange(8),
             "task": "sst2"}
    parts = [next(train.shards(iter([batch]), k, 4)) for k in range(4)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert all(p["labels"].shape == (2,) and p["task"] == "sst2" for p in parts)
    assert next(train.shards(iter([batch]), 0, 1)) is batch
