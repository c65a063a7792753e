"""lora.py alone, and lora.py + fimlora.py together, work when copied into a bare folder.

Oracle: a fresh interpreter in tmp_path with no PYTHONPATH; it fails if either file imports
models, data, numpy or a peer.  Run: .venv/bin/python -m pytest tests/test_vendoring.py -q
"""

import ast
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

ALLOWED = {"lora.py": {"lora"}, "fimlora.py": {"lora"}}

LORA_ONLY = """
import torch, torch.nn as nn
from lora import add_lora, lora_state_dict
m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
add_lora(m, ["0"], r=2, alpha=4)
print(m(torch.randn(3, 8)).shape, sorted(lora_state_dict(m)))
"""

WITH_FIMLORA = """
import torch, torch.nn as nn
from lora import add_lora, lora_layers
import fimlora
print(fimlora.allocate_ranks({"a": 1.0, "b": 3.0}, budget=4, r_min=1, r_max=3))
"""


def _run(tmp_path, files, code):
    for f in files:
        shutil.copy(ROOT / f, tmp_path / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_lora_alone_imports_and_runs(tmp_path):
    out = _run(tmp_path, ["lora.py"], LORA_ONLY)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 2])" in out.stdout and "0.lora_A" in out.stdout


def test_lora_and_fimlora_together(tmp_path):
    out = _run(tmp_path, ["lora.py", "fimlora.py"], WITH_FIMLORA)
    assert out.returncode == 0, out.stderr
    assert "{'a': 1, 'b': 3}" in out.stdout


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_only_stdlib_torch_and_lora_imported(name):
    tree = ast.parse((ROOT / name).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    third_party = mods - set(sys.stdlib_module_names) - {"torch", "__future__"}
    assert third_party <= ALLOWED[name], f"{name} imports {third_party - ALLOWED[name]}"
