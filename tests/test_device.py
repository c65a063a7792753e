"""The random draws of a run do not depend on where the model lives: A is drawn on the
generator's device and moved afterwards (a CPU generator cannot fill a CUDA tensor). CPU-only
proof with a model on the `meta` device; the real CUDA path runs when a GPU is present.

Run: .venv/bin/python -m pytest tests/test_device.py -q
"""

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear, add_lora, resize_lora


def test_adapter_draw_happens_on_the_generator_device(monkeypatch):
    """A model on another device (meta here, CUDA in practice) gets A drawn on the CPU
    generator's device, then moved: the fill never sees a foreign device."""
    seen = []
    real = nn.init.kaiming_uniform_

    def spy(t, *a, **k):
        seen.append((t.device.type, k.get("generator").device.type))
        return real(t, *a, **k)
    base = nn.Linear(6, 5, device="meta")
    monkeypatch.setattr(nn.init, "kaiming_uniform_", spy)
    layer = LoRALinear(base, 3, alpha=6, generator=torch.Generator())
    resize_lora(layer, 2, generator=torch.Generator())
    assert seen == [("cpu", "cpu"), ("cpu", "cpu")]
    assert layer.lora_A.device.type == "meta" and layer.lora_B.device.type == "meta"


def test_same_generator_same_adapter_whatever_the_model_dtype_path():
    """The same seed gives the same A for a model adapted before or after .to(device)."""
    def adapted(move_first: bool):
        model = nn.Sequential(nn.Linear(8, 8))
        if move_first:
            model.to("cpu")
        add_lora(model, ["0"], r=4, alpha=8, generator=torch.Generator().manual_seed(7))
        return model[0].lora_A.detach()
    assert torch.equal(adapted(True), adapted(False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_adapter_from_cpu_generator():
    base = nn.Linear(6, 5).cuda()
    layer = LoRALinear(base, 3, alpha=6, generator=torch.Generator().manual_seed(0))
    ref = LoRALinear(nn.Linear(6, 5), 3, alpha=6, generator=torch.Generator().manual_seed(0))
    assert layer.lora_A.is_cuda and torch.equal(layer.lora_A.cpu(), ref.lora_A)
