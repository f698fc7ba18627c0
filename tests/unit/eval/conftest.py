"""These tests import the model (transformers, DeepSpeed's Triton ops) at collection time, before
tests/unit/kernels/conftest.py is collected; Triton reads TRITON_INTERPRET when a kernel is
decorated, so set it here too (same rule as the kernels' conftest), or the kernel tests collected
after this directory would find Triton in compiled mode on a machine without a GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
