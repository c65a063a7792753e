"""lora.py alone, and lora.py + fimlora.py together, work when copied into a bare folder.

Oracle: one fresh interpreter in tmp_path with no PYTHONPATH, first with lora.py alone, then
with fimlora.py copied beside it; it fails if either file imports models, data, numpy or a peer.
Run: .venv/bin/python -m pytest tests/test_vendoring.py -q
"""

import ast
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

ALLOWED = {"lora.py": {"lora"}, "fimlora.py": {"lora"}}

NO_NUMPY = "import sys; sys.modules['numpy'] = None  # any numpy import now fails\n"

LORA_ONLY = NO_NUMPY + """
import torch, torch.nn as nn
from lora import add_lora, lora_state_dict, save_adapter, load_adapter
m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
add_lora(m, ["0"], r=2, alpha=4)
with torch.no_grad():
    m[0].lora_B.normal_()
x = torch.randn(3, 8)
save_adapter("adapter", m, ["0"])
save_adapter("adapter_peft", m, ["0"], format="peft")
for folder in ("adapter", "adapter_peft"):
    m2 = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if "lora" not in k}, strict=False)
    add_lora(m2, ["0"], r=2, alpha=4)
    load_adapter(folder, m2)
    assert torch.equal(m2(x), m(x)), folder
print(m(x).shape, sorted(lora_state_dict(m)))
"""

WITH_FIMLORA = """
import shutil
shutil.copy(FIMLORA, "fimlora.py")  # only now: lora.py ran above without it
from lora import add_lora, lora_layers
import fimlora
m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
add_lora(m, ["0", "2"], r=2, alpha=4)
batches = [torch.randn(4, 8) for _ in range(2)]
loss_fn = lambda model, x: model(x).square().mean()
res = fimlora.initialize_fim_ranks(m, batches, loss_fn, per_example=True)
assert sum(res["ranks"].values()) == 4
fimlora.lorada_init(m, [{"x": x} for x in batches], lambda model, b: loss_fn(model, b["x"]))
print(fimlora.allocate_ranks({"a": 1.0, "b": 3.0}, budget=4, r_min=1, r_max=3))
"""


def test_lora_alone_then_with_fimlora_imports_and_runs(tmp_path):
    shutil.copy(ROOT / "lora.py", tmp_path / "lora.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"FIMLORA = {str(ROOT / 'fimlora.py')!r}\n" + LORA_ONLY + WITH_FIMLORA
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 2])" in out.stdout and "0.lora_A" in out.stdout
    assert "{'a': 1, 'b': 3}" in out.stdout


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_only_stdlib_torch_and_lora_imported(name):
    tree = ast.parse((ROOT / name).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module}
    third_party = mods - set(sys.stdlib_module_names) - {"torch", "__future__"}
    assert third_party <= ALLOWED[name], f"{name} imports {third_party - ALLOWED[name]}"
