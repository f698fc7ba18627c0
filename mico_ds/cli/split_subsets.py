"""Split a corpus into NESTED subsets stratified by category (MiCo appendix "Dataset Split", Algorithm 2).

    # from a manifest: writes OUT/<manifest>-<name>.jsonl per subset (paths rewritten for OUT)
    python tools/split_subsets.py --manifest raw/manifest.jsonl --sizes 0.01,0.1,0.5 --out subsets
    # from shards: writes OUT/<name>.keys.txt per subset, and with --write-shards OUT/<name>/*.tar
    python tools/split_subsets.py --shards 'data/c/corpus-{000000..000099}.tar' \\
        --sizes 1000000,10000000,110000000,334000000 --names 1M,10M,110M,334M --out subsets --write-shards

Sizes are fractions (any value with a '.', each in (0, 1]) or counts. Every smaller subset lies inside the
next larger one, and each subset keeps the category proportions of the whole corpus (each category
within one sample of its exact share: largest-remainder rounding, made monotone across sizes). The
paper's Algorithm 2 calls sklearn's stratified train_test_split once per size, which does not nest the
subsets; this tool shuffles each category once (seeded, 42 like the paper) and takes prefixes.
OUT/subsets.json records the sizes and per-category counts. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mico_ds.cli.common import fail
from mico_ds.data.io import expand_urls, iter_tar_samples
from mico_ds.data.write.manifest import MANIFEST_MEDIA_FIELDS, read_manifest
from mico_ds.data.write.subsets import nested_stratified_subsets, resolve_sizes, scan_shards
from mico_ds.data.write.tar import ShardWriter, write_json_atomic

NONE_CATEGORY = "(none)"


def parse_sizes(text: str) -> list[int | float]:
    """'0.01,0.1' -> fractions (floats); '100,1000' or '1e6' -> counts (ints)."""
    out: list[int | float] = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            if "." in tok:
                out.append(float(tok))
            else:
                value = float(tok)
                if not value.is_integer():
                    raise ValueError
                out.append(int(value))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a size: {tok!r} (use counts like 1000 or fractions like 0.1)"
            ) from None
    return out


def human(n: int) -> str:
    """1000 -> '1k', 10_000_000 -> '10M', 1234 -> '1234'."""
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def strata(records: list[dict[str, Any]], by: str) -> list[str]:
    cats = [r["category"] if r["category"] is not None else NONE_CATEGORY for r in records]
    if by == "category":
        return [str(c) for c in cats]
    return [f"{c}|{'+'.join(r['modalities'])}" for c, r in zip(cats, records)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSON-lines manifest (see tools/make_shards.py)")
    src.add_argument("--shards", help="shards: a directory, a .tar, a brace pattern or a glob")
    p.add_argument("--sizes", type=parse_sizes, required=True, help="e.g. 0.01,0.1,0.5 or 1000,10000")
    p.add_argument("--names", default=None, help="subset names, comma-separated (default: 1k, 10M, ...)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=42, help="shuffling seed (%(default)s, as Algorithm 2)")
    p.add_argument(
        "--stratify", choices=("category", "category+modalities"), default="category",
        help="strata: the json/manifest category, or category and the set of present modalities",
    )  # fmt: skip
    p.add_argument(
        "--write-shards", action="store_true", help="with --shards: also copy each subset to shards"
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="with --write-shards (%(default)s)")
    p.add_argument("--prefix", default="corpus", help="with --write-shards: shard name prefix (%(default)s)")
    a = p.parse_args(argv)
    if a.write_shards and not a.shards:
        p.error(
            "--write-shards needs --shards (for a manifest, run tools/make_shards.py on the subset manifests)"
        )
    out = Path(a.out)
    try:
        if a.manifest:
            entries = read_manifest(a.manifest)
            records = [
                {
                    "key": e.key,
                    "category": e.category,
                    "modalities": [m for m in MANIFEST_MEDIA_FIELDS if m in e.media],
                }
                for e in entries
            ]
        else:
            records = scan_shards(a.shards)
        counts = resolve_sizes(a.sizes, len(records))
        names = a.names.split(",") if a.names else [human(c) for c in counts]
        if len(names) != len(counts) or len(set(names)) != len(names):
            raise ValueError(f"--names {names} must be {len(counts)} distinct names, one per size")
        cats = strata(records, a.stratify)
        subsets = nested_stratified_subsets(cats, counts, seed=a.seed)
    except (ValueError, OSError) as e:
        return fail("split_subsets", e)

    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "source": a.manifest or a.shards,
        "seed": a.seed,
        "stratify": a.stratify,
        "total": len(records),
        "categories": dict(sorted(Counter(cats).items())),
        "subsets": {},
    }
    for name, idx in sorted(zip(names, subsets), key=lambda x: len(x[1])):
        info: dict[str, Any] = {
            "size": len(idx),
            "categories": dict(sorted(Counter(cats[i] for i in idx).items())),
        }
        if a.manifest:
            info["manifest"] = write_subset_manifest(Path(a.manifest), entries, idx, out, name)
        else:
            keys_file = out / f"{name}.keys.txt"
            keys_file.write_text("".join(records[i]["key"] + "\n" for i in idx))
            info["keys"] = keys_file.name
        summary["subsets"][name] = info
        print(f"{name:>8}: {len(idx):>10} samples  {info.get('manifest') or info['keys']}")
    if a.write_shards:
        write_subset_shards(a.shards, names, subsets, out, a.prefix, a.samples_per_shard, summary)
    write_json_atomic(out / "subsets.json", summary)
    return 0


def write_subset_manifest(manifest: Path, entries: list, idx: Any, out: Path, name: str) -> str:
    """Write the subset's manifest lines in original order, media paths rewritten relative to ``out``."""
    lines = manifest.read_text(encoding="utf-8").splitlines()
    path = out / f"{manifest.stem}-{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in idx:
            entry = entries[i]
            obj = json.loads(lines[entry.line - 1])
            for field, full in entry.media.items():
                obj[field] = os.path.relpath(full, out.resolve())
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path.name


def write_subset_shards(
    shards: str, names: list[str], subsets: list, out: Path, prefix: str, per_shard: int, summary: dict
) -> None:
    """Copy each subset's samples into OUT/<name>/<prefix>-*.tar (+ sizes.json) in one pass over the input."""
    membership: dict[int, list[int]] = {}
    for s, idx in enumerate(subsets):
        for i in idx.tolist():
            membership.setdefault(i, []).append(s)
    writers = [ShardWriter(out / name, prefix, per_shard) for name in names]
    try:
        pos = 0
        for shard in expand_urls(shards):
            for key, members in iter_tar_samples(shard):
                for s in membership.get(pos, ()):
                    writers[s].write(key, members)
                pos += 1
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for name, w in zip(names, writers):
        sizes = w.close()
        summary["subsets"][name]["shards"] = f"{name}/"
        summary["subsets"][name]["num_shards"] = len(sizes)


if __name__ == "__main__":
    sys.exit(main())
