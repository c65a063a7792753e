"""Shared test setup: a derandomised hypothesis profile for CI and one seed per test.

Run: make test   (or: .venv/bin/python -m pytest -q)
"""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SST2 = SHARED / "data" / "glue" / "SST-2"
sys.path.insert(0, str(ROOT))

settings.register_profile("ci", deadline=None, derandomize=True, database=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# A shell's background job (`make test &`) starts with SIGINT ignored, and every child inherits
# that: the Ctrl-C tests' processes would never see their SIGINT. A terminal's Ctrl-C is what
# they test, so the children start with the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """`make crosscheck` sets FIMLORA_REQUIRE_PEERS=1 after installing the peers: there, a peer
    test that skips (a missing package or file) fails instead of passing silently."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("FIMLORA_REQUIRE_PEERS") == "1"
            and item.get_closest_marker("peer")):
        report.outcome = "failed"
        report.longrepr = f"peer test skipped under FIMLORA_REQUIRE_PEERS=1: {report.longrepr}"


def probe_outputs(layers: dict, seen: dict) -> list:
    """Oracle hooks, independent of fimlora's: each layer's output gets a zero probe added, and
    seen[name] = (layer input, probe), so ∂L/∂probe is the output gradient δ. Returns the hook
    handles (remove them after the backward pass)."""
    def hook(name):
        def f(mod, args, out):
            probe = torch.zeros_like(out, requires_grad=True)
            seen[name] = (args[0].detach(), probe)
            return out + probe
        return f
    return [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
