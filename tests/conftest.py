"""Session-wide test settings, applied before any test module is collected.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, and several test modules import
code that imports Triton (the model pulls in DeepSpeed's Triton ops) at collection time; without a
GPU the kernels must run in Triton's CPU interpreter, so the variable is set here, once, before any
of them. Spawned ranks inherit it.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
