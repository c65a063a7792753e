"""Fisher-guided LoRA: FIM-LoRA rank allocation, FW-LoRA regularisation, LoRA-DA initialisation.

    from lora import add_lora
    from fimlora import initialize_fim_ranks
    add_lora(model, targets=["query", "key", "value"], r=8, alpha=16)
    result = initialize_fim_ranks(model, batches, loss_fn)   # loss_fn(model, batch) -> scalar

Imports only the standard library, torch and lora.py, so the two files can be copied together.

References:
    FIM-LoRA: arXiv:2605.16800.   LoRA-DA: arXiv:2510.24561.
    FW-LoRA: "Fisher-Weighted LoRA: one-line importance-aware regularisation" (no public paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from lora import LoRALinear, lora_layers, lora_scaling, resize_lora

# -----------------------------------------------------------------------------
# 1. calibration statistics (hooks)

# -----------------------------------------------------------------------------
# 2. budgeted rank allocation (pure Python)

# -----------------------------------------------------------------------------
# 3. FIM-LoRA: calibrate, allocate, resize

# -----------------------------------------------------------------------------
# 4. FW-LoRA: Fisher-weighted penalty on ΔW

# -----------------------------------------------------------------------------
# 5. LoRA-DA: data-aware closed-form initialisation
