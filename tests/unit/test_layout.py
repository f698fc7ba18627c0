"""The layout rules of docs/architecture.md, checked on the source: where DeepSpeed and
torch.distributed may be imported, what evaluation may import, the size of a module, and that the
code cites the project's own documents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mico_ds"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 600
DISTRIBUTED_HOMES = (
    "distributed",
    "train",
)  # the only packages that may import DeepSpeed / torch.distributed


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement of ``path`` names (any depth)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def test_the_rules_see_the_package() -> None:
    assert len(MODULES) > 50 and {_part(p) for p in MODULES} >= {
        "data",
        "models",
        "eval",
        "train",
        "checkpoint",
    }
    # the checker itself finds a DeepSpeed import where there is one
    assert "deepspeed" in imported_modules(PACKAGE / "distributed" / "engine.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_deepspeed_and_torch_distributed_only_in_distributed_and_train(path: Path) -> None:
    if _part(path) in DISTRIBUTED_HOMES:
        return
    bad = sorted(
        m
        for m in imported_modules(path)
        if m == "deepspeed" or m.startswith(("deepspeed.", "torch.distributed"))
    )
    assert not bad, (
        f"{path.relative_to(REPO)} imports {bad}: that belongs in mico_ds/distributed or mico_ds/train"
    )


def test_evaluation_imports_nothing_from_the_trainer() -> None:
    for path in (PACKAGE / "eval").rglob("*.py"):
        bad = sorted(
            m for m in imported_modules(path) if m == "mico_ds.train" or m.startswith("mico_ds.train.")
        )
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_over_the_size_limit(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (> {MAX_LINES}): split it"


def test_the_code_cites_the_projects_own_documents() -> None:
    tracked = [*MODULES, *(REPO / "tools").glob("*.py"), *(REPO / "tests").rglob("*.py")]
    tracked += [*(REPO / "docs").glob("*.md"), REPO / "README.md"]
    bad = [str(p.relative_to(REPO)) for p in tracked if "DESIGN" + ".md" in p.read_text()]
    assert not bad, f"cite docs/architecture.md, not a file outside the repository: {bad}"
    cited = {m for p in MODULES for m in re.findall(r"docs/[\w-]+\.md", p.read_text())}
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"the code cites documents that do not exist: {missing}"


def test_tools_do_not_patch_sys_path() -> None:
    bad = [
        str(p.relative_to(REPO)) for p in (REPO / "tools").glob("*.py") if "sys.path.insert" in p.read_text()
    ]
    assert not bad, f"tools run the installed package (pip install -e . or the wheel): {bad}"
