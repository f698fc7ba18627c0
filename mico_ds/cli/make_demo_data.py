"""Generate the built-in demo corpus (synthetic omni-modal shards + a tokenizer); nothing is downloaded.

    python tools/make_demo_data.py --out data/demo                      # defaults: 2048 train, 256 val
    python tools/make_demo_data.py --out /tmp/tiny --num-train 16 --num-val 8 --force

Writes omni/{train,val,tune}-*.tar, image_text/, audio_text/, video_text/ (each with sizes.json),
tokenizer/tokenizer.model and demo.json (last). Without --force an existing corpus with the same
parameters is reused. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mico_ds.demo import DemoParams, ensure_demo_corpus, make_demo_corpus


def main(argv: list[str] | None = None) -> int:
    d = DemoParams()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo", help="output directory (default: %(default)s)")
    p.add_argument("--num-train", type=int, default=d.num_train, help="omni training samples (%(default)s)")
    p.add_argument(
        "--num-val", type=int, default=d.num_val, help="held-out omni samples, unique captions (%(default)s)"
    )
    p.add_argument(
        "--num-tune",
        type=int,
        default=d.num_tune,
        help="held-out omni tuning samples, not val's (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="generation seed (%(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard, help="(%(default)s)")
    p.add_argument(
        "--image-size", type=int, default=d.image_size, help="frame side in pixels, even (%(default)s)"
    )
    p.add_argument(
        "--num-frames", type=int, default=d.num_frames, help="video frames per sample (%(default)s)"
    )
    p.add_argument("--audio-seconds", type=float, default=d.audio_seconds, help="(%(default)s)")
    p.add_argument("--sample-rate", type=int, default=d.sample_rate, help="audio sample rate (%(default)s)")
    p.add_argument("--no-frames", action="store_true", help="do not store frame{i}.jpg members")
    p.add_argument("--no-single-pair", action="store_true", help="skip image_text/audio_text/video_text")
    p.add_argument(
        "--num-single-pair", type=int, default=None, help="samples per single-pair corpus (num_train/2)"
    )
    p.add_argument(
        "--num-pair-heldout",
        type=int,
        default=d.num_pair_heldout,
        help="image_text val and test items each, a downstream retrieval split (%(default)s: none)",
    )
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary (%(default)s)")
    p.add_argument("--workers", type=int, default=None, help="generator processes (default: CPUs, at most 8)")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching corpus exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    kwargs = dict(
        num_train=a.num_train, num_val=a.num_val, num_tune=a.num_tune, seed=a.seed,
        samples_per_shard=a.samples_per_shard, image_size=a.image_size, num_frames=a.num_frames,
        audio_seconds=a.audio_seconds, sample_rate=a.sample_rate, with_frames=not a.no_frames,
        single_pair=not a.no_single_pair, num_single_pair=a.num_single_pair, vocab_size=a.vocab_size,
        num_pair_heldout=a.num_pair_heldout, progress=not a.quiet, workers=a.workers,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        index = (make_demo_corpus if a.force else ensure_demo_corpus)(a.out, **kwargs)
    except ValueError as e:
        p.error(str(e))
    for name, corpus in index["corpora"].items():
        for split, info in corpus["splits"].items():
            print(f"{name:>10} {split:<5} {info['num_samples']:>6} samples  {a.out}/{info['shards']}")
    print(f"tokenizer: {a.out}/{index['tokenizer']['path']} ({index['tokenizer']['vocab_size']} pieces)")
    print(f"done in {time.perf_counter() - t0:.1f} s -> {Path(a.out) / 'demo.json'}")
    if a.quiet:
        return 0
    print(json.dumps(index["params"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
