"""GPU tests: marked ``gpu`` and skipped where there is no CUDA device (CI); run them on a GPU machine
with ``python -m pytest -m gpu tests/gpu``. Their cases are those of ``tools/gpu_check.py``."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA device (tests/gpu)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
