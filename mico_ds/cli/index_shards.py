"""Count the samples of every shard, in parallel, and write sizes.json next to the shards.

    python tools/index_shards.py 'data/mycorpus/mycorpus-*.tar'
    python tools/index_shards.py /data/laion/ --workers 16 --skip-bad
    python tools/index_shards.py 'data/mycorpus/mycorpus-{000000..000099}.tar' --force --json

Run it once after shards are written by another tool (img2dataset, video2dataset, a copy of someone's
corpus): afterwards sizing the corpus (tools/inspect_shards.py, the loader's start-up log) reads
sizes.json instead of opening every tar. Samples are counted from the tar headers alone (data is
seeked over), by the loader's rule: consecutive members sharing a key are one sample.

Each shard directory's sizes.json is merged: shards already listed are kept (--force recounts them),
entries of shards not named here are kept, and the file is replaced atomically (temporary name, then
rename). Local shards only: pipe: commands and scheme:// URLs are refused (run it where the shards
are). A shard that cannot be read is named with its error and makes the exit status 1 unless
--skip-bad; the other shards' counts are written either way. See docs/data.md, "Sizing and indexing".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mico_ds.cli.common import fail
from mico_ds.data.io import expand_urls, read_sizes
from mico_ds.data.sizing import count_shards, is_remote
from mico_ds.data.write.tar import write_sizes


def index_shards(urls: list[str], *, workers: int, force: bool = False, progress: bool = False) -> dict:
    """Count the shards ``urls`` not yet in their directory's sizes.json (all with ``force``) and
    merge the counts into it. Returns the summary: counted, kept, bad ({path: error}), samples,
    written (sizes.json paths)."""
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        by_dir.setdefault(os.path.dirname(os.path.abspath(u)), []).append(u)
    existing = {d: read_sizes(d) for d in by_dir}
    todo = [u for d, us in by_dir.items() for u in us if force or os.path.basename(u) not in existing[d]]
    counts, bad = count_shards(todo, workers=workers, progress=progress)
    written, samples = [], 0
    for d, us in by_dir.items():
        # Re-read just before writing: entries another run added meanwhile are kept (merge, not replace).
        sizes = {**existing[d], **read_sizes(d)}
        for u in us:
            name = os.path.basename(u)
            if u in counts:
                sizes[name] = counts[u]
            elif u in bad:
                sizes.pop(name, None)  # unreadable now: a stale figure would be wrong
            if name in sizes:
                samples += sizes[name]
        if sizes != existing[d] or any(u in counts for u in us):
            written.append(str(write_sizes(d, sizes)))
    return {
        "shards": len(urls),
        "counted": len(counts),
        "kept": len(urls) - len(todo),
        "bad": bad,
        "samples": samples,
        "written": written,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("urls", nargs="+", help="local shards: brace patterns, globs, directories (several ok)")
    p.add_argument("--root", default=None, help="directory relative URLs are resolved against (default: .)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="counting processes (default: cpu count)"
    )
    p.add_argument("--force", action="store_true", help="recount shards already listed in sizes.json")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 although some shards are unreadable")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    remote = [u for u in a.urls if is_remote(u)]
    if remote:
        return fail(
            "index_shards",
            f"{remote[0]!r} is not a local shard: index_shards counts local files only "
            "(run it on the machine that holds the shards, then copy sizes.json next to them)",
        )
    if a.workers < 1:
        return fail("index_shards", f"--workers must be >= 1, got {a.workers}")
    try:
        urls = expand_urls(a.urls, a.root)
    except ValueError as e:
        return fail("index_shards", e)
    try:
        out = index_shards(urls, workers=a.workers, force=a.force, progress=not a.no_progress)
    except OSError as e:  # sizes.json could not be written (permissions, full disk)
        return fail("index_shards", e)
    for err in out["bad"].values():
        print(f"index_shards: unreadable shard: {err}", file=sys.stderr)  # err names the file
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"{out['samples']} samples in {out['shards'] - len(out['bad'])} shard(s): "
            f"{out['counted']} counted, {out['kept']} already in sizes.json, {len(out['bad'])} unreadable"
        )
        for w in out["written"]:
            print(f"wrote {w}")
    if out["bad"] and not a.skip_bad:
        print(
            f"index_shards: {len(out['bad'])} unreadable shard(s) (not in sizes.json); --skip-bad to accept",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
