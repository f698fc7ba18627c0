"""Stream every sample of some shards through the training decoders (eval mode) and report.

Prints, per modality, how many samples decoded and at which tensor shapes, and the skipped samples
by reason with a few example keys; exits with status 1 when the skip rate passes the bound (the same
check a training run makes), so it can gate a data-preparation pipeline.

    python tools/inspect_shards.py 'data/demo/omni/train-{000000..000007}.tar'
    python tools/inspect_shards.py data/demo/image_text --modalities image --json
    python tools/inspect_shards.py --recipe demo --corpus omni          # shards, modalities, geometry
    python tools/inspect_shards.py 'pipe:curl -s https://host/laion-{0000..0099}.tar' --max-samples 5000

Without --modalities every modality a sample carries is decoded and nothing counts as missing; with
it, those modalities are required (a sample lacking one is skipped as "missing_modality").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from mico_ds.config import InputConfig, load_config
from mico_ds.data import schema
from mico_ds.data.io import expand_urls, find_member, iter_tar
from mico_ds.data.read.decode import SampleDecoder
from mico_ds.data.read.skips import SkipSample, SkipStats
from mico_ds.data.sizing import corpus_sizes


class Report:
    """Counts of one inspection (mergeable across shards / processes)."""

    def __init__(self) -> None:
        self.samples = 0
        self.decoded: Counter = Counter()
        self.shapes: dict[str, Counter] = {}
        self.skips = SkipStats()

    def add_sample(self, sample: dict, decoder_for, required: list[str] | None) -> None:
        self.samples += 1
        self.skips.seen += 1
        reason = sample.get("__error__")
        if reason is not None:
            self.skips.add(reason, sample["__key__"])
            return
        mods = required or [m for m in schema.MODALITIES if find_member(sample, m)]
        try:
            out = decoder_for(tuple(mods))(sample)
        except SkipSample as e:
            self.skips.add(e.reason, sample["__key__"])
            return
        for m in mods:
            self.decoded[m] += 1
            self.shapes.setdefault(m, Counter())["x".join(map(str, out[m].shape))] += 1
        self.decoded["text"] += 1

    def merge(self, other: Report) -> None:
        self.samples += other.samples
        self.decoded.update(other.decoded)
        for m, c in other.shapes.items():
            self.shapes.setdefault(m, Counter()).update(c)
        self.skips.merge(other.skips.seen, dict(other.skips.skipped), other.skips.examples)

    def as_dict(self) -> dict:
        skipped = self.skips.total_skipped
        return {
            "samples": self.samples,
            "decoded": dict(self.decoded),
            "shapes": {m: dict(c) for m, c in self.shapes.items()},
            "skipped": dict(self.skips.skipped),
            "skip_rate": skipped / self.samples if self.samples else 0.0,
            "examples": self.skips.examples,
        }


def _decoders(inputs: InputConfig):
    cache: dict[tuple[str, ...], SampleDecoder] = {}

    def get(mods: tuple[str, ...]) -> SampleDecoder:
        if mods not in cache:
            cache[mods] = SampleDecoder(mods, inputs, train=False)
        return cache[mods]

    return get


def inspect_shard(url: str, inputs: InputConfig, required: list[str] | None, limit: int | None) -> Report:
    rep, get = Report(), _decoders(inputs)
    for i, sample in enumerate(iter_tar(url)):
        if limit is not None and i >= limit:
            break
        rep.add_sample(sample, get, required)
    return rep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "urls", nargs="*", help="shard URLs: brace patterns, globs, directories, pipe:CMD (several ok)"
    )
    p.add_argument("--root", default=None, help="directory relative URLs are resolved against (default: "
                   "data.root of --recipe, else the current directory)")  # fmt: skip
    p.add_argument(
        "--modalities", default=None, help=f"comma-separated required modalities, of {schema.MODALITIES}"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--max-skip-rate", type=float, default=None,
                   help="exit 1 above this skipped fraction (default: data.max_skip_rate, 0.05)")  # fmt: skip
    p.add_argument("--max-samples", type=int, default=None, help="inspect at most this many samples")
    p.add_argument("--workers", type=int, default=1, help="processes, one shard at a time each (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("geometry (default: InputConfig defaults, or those of --recipe)")
    g.add_argument("--recipe", default=None, help="take geometry, data.root and skip bound from this recipe")
    g.add_argument(
        "--corpus", default=None, help="with --recipe: also take shards and modalities of this corpus"
    )
    for name, tp in (("image-size", int), ("num-frames", int), ("sample-rate", int), ("mel-bins", int),
                     ("clip-frames", int), ("num-clips", int)):  # fmt: skip
        g.add_argument(f"--{name}", type=tp, default=None, help=f"inputs.{name.replace('-', '_')}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs, root, bound = InputConfig(), args.root, args.max_skip_rate
    required = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    urls_spec: list[str] = list(args.urls)
    if args.recipe:
        cfg = load_config(args.recipe)
        inputs = cfg.inputs
        root = root if root is not None else cfg.data.root
        bound = bound if bound is not None else cfg.data.max_skip_rate
        if args.corpus:
            by_name = {c.name: c for c in cfg.data.corpora}
            if args.corpus not in by_name:
                raise SystemExit(f"corpus {args.corpus!r} not in recipe {args.recipe!r}: {sorted(by_name)}")
            c = by_name[args.corpus]
            if c.joined_from:
                raise SystemExit(f"corpus {c.name!r} is joined from {c.joined_from}: inspect those instead")
            urls_spec = urls_spec or [c.shards]
            required = required or list(c.modalities)
    elif args.corpus:
        raise SystemExit("--corpus needs --recipe")
    if not urls_spec:
        raise SystemExit("no shards given (URLS, or --recipe with --corpus)")
    bad = [m for m in required or [] if m not in schema.MODALITIES]
    if bad:
        raise SystemExit(f"unknown modalities {bad}; known: {schema.MODALITIES}")
    for name in ("image_size", "num_frames", "sample_rate", "mel_bins", "clip_frames", "num_clips"):
        if getattr(args, name) is not None:
            setattr(inputs, name, getattr(args, name))
    bound = 0.05 if bound is None else bound
    try:
        urls = expand_urls(urls_spec, root)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    from tqdm import tqdm

    # The bar's total from the indexes alone (sizes.json, *_stats.json): every tar is read below anyway.
    known = corpus_sizes(urls, open_missing=False)
    total = known.total if known.complete else None
    if args.max_samples is not None:
        total = min(total, args.max_samples) if total is not None else args.max_samples
    bar = tqdm(total=total, unit="sample", disable=args.no_progress or None, file=sys.stderr)
    rep = Report()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            futs = [pool.submit(inspect_shard, u, inputs, required, args.max_samples) for u in urls]
            for f in futs:
                part = f.result()
                rep.merge(part)
                bar.update(part.samples)
                if args.max_samples is not None and rep.samples >= args.max_samples:
                    for g in futs:
                        g.cancel()
                    break
    else:
        get = _decoders(inputs)
        for u in urls:
            for sample in iter_tar(u):
                if args.max_samples is not None and rep.samples >= args.max_samples:
                    break
                rep.add_sample(sample, get, required)
                bar.update(1)
    bar.close()

    out = rep.as_dict()
    out["max_skip_rate"] = bound
    out["indexed"] = {"samples": known.total, "shards": known.by_source(), "unsized": len(known.unsized)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['samples']} samples in {len(urls)} shard(s); indexed: {known.describe()}")
        for m, n in out["decoded"].items():
            shapes = ", ".join(f"{s} ({k})" for s, k in out["shapes"].get(m, {}).items())
            print(f"  {m:<7} decoded {n:>8}" + (f"   shapes {shapes}" if shapes else ""))
        if out["skipped"]:
            print(f"skipped {sum(out['skipped'].values())} ({out['skip_rate']:.2%}):")
            for r, n in sorted(out["skipped"].items(), key=lambda kv: -kv[1]):
                print(f"  {r:<17} {n:>8}   e.g. {', '.join(out['examples'].get(r, []))}")
    if out["samples"] and out["skip_rate"] > bound:
        print(f"skip rate {out['skip_rate']:.2%} > bound {bound:.2%}", file=sys.stderr)
        return 1
    if not out["samples"]:
        print("no samples found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
