"""``python -m mico_ds.checkpoint RUN_DIR [--tag TAG] [--size-only]``: check one checkpoint against its
manifest (sizes and CRC-32 checksums recorded when it was saved), e.g. a copy from another cluster
before resuming it. Exit status 0: intact (or no manifest: said so), 2: damaged, naming every file."""

from __future__ import annotations

import argparse
import sys

from mico_ds.checkpoint.layout import locate
from mico_ds.checkpoint.manifest import require_intact


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mico_ds.checkpoint", description=__doc__)
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoint (tag) dir")
    p.add_argument("--tag", default="latest", help="checkpoint tag, e.g. step00040000 (%(default)s)")
    p.add_argument("--size-only", action="store_true", help="check sizes only, not checksums (no reads)")
    args = p.parse_args(argv)
    try:
        tag_dir = locate(args.checkpoint, args.tag).tag_dir
        print(require_intact(tag_dir, checksums=not args.size_only, skip_flag=None))
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
