"""The shell commands of the README and docs/: every line of every ```bash block, continuation lines
joined, comments dropped. A block whose first line is a comment starting with ``# cluster example``
holds commands for a cluster (not run here)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER_MARK = "# cluster example"
_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository
    line: int  # 1-based line of the command's first line
    text: str  # the command, continuation lines joined
    cluster: bool  # in a block marked as a cluster example

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def commands(files: list[Path] | None = None) -> list[DocCommand]:
    out: list[DocCommand] = []
    for f in files or doc_files():
        text = f.read_text()
        for m in _BLOCK.finditer(text):
            first_line = text.count("\n", 0, m.start(1)) + 1
            lines = m.group(1).splitlines()
            cluster = bool(lines) and lines[0].strip().startswith(CLUSTER_MARK)
            pending, start = "", 0
            for i, raw in enumerate(lines):
                body = _strip_comment(raw)
                if not body.strip() and not pending:
                    continue
                if not pending:
                    start = first_line + i
                if body.endswith("\\"):
                    pending += body[:-1].strip() + " "
                    continue
                cmd = (pending + body.strip()).strip()
                pending = ""
                if cmd:
                    out.append(DocCommand(str(f.relative_to(REPO)), start, cmd, cluster))
    return out
