"""Turn a raw-media manifest (JSON lines) into WebDataset tar shards + sizes.json.

    python tools/make_shards.py --manifest raw/manifest.jsonl --out data/mycorpus --prefix mycorpus
    python tools/make_shards.py --manifest m.jsonl --out shards --samples-per-shard 500 \\
        --max-shard-bytes 1GB --derive-normals

Manifest line (paths relative to the manifest; every field but key optional):
  {"key": "clip0001", "image": "img/1.jpg", "video": "vid/1.mp4", "audio": "aud/1.flac",
   "depth": "depth/1.png", "normal": "normal/1.png",
   "captions": {"vision": "...", "audio": "...", "subtitle": "...", "depth": "..."},
   "category": "music", "source": "my-corpus"}

Accepted media: JPEG/PNG/WebP images, MP4/WebM/GIF video, WAV/FLAC/MP3/M4A/AAC/Ogg/Opus audio, 16-bit
PNG or .npy depth, 8-bit RGB PNG normals. Each file is opened with its decoder (Pillow, PyAV, soundfile,
numpy) and stored byte-for-byte. A missing or unreadable file stops the run with the manifest line and
path (and removes this run's shards) unless --skip-bad. Shards are written under temporary names and
renamed when complete. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from mico_ds.cli.common import fail, parse_size
from mico_ds.data.write.manifest import make_shards


def byte_size(text: str) -> int:
    """argparse type: '500MB', '1GB', '1GiB', '1048576' -> bytes (decimal units unless ...iB)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSON-lines manifest")
    p.add_argument("--out", required=True, help="output directory for the shards and sizes.json")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="max samples per shard (%(default)s)")
    p.add_argument(
        "--max-shard-bytes", type=byte_size, default=None, help="max shard size, e.g. 1GB or 1GiB (none)"
    )
    p.add_argument("--prefix", default="corpus", help="shard name prefix: PREFIX-000000.tar (%(default)s)")
    p.add_argument("--derive-normals", action="store_true", help="write normal.png from depth when missing")
    p.add_argument(
        "--depth-scale", type=float, default=1.0,
        help="for --derive-normals: pixels per depth unit, e.g. 0.032 if 64 px span 2000 mm (%(default)s)",
    )  # fmt: skip
    p.add_argument("--source", default=None, help="json 'source' of lines without one (manifest name)")
    p.add_argument("--skip-bad", action="store_true", help="skip samples with unreadable files; report them")
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        result = make_shards(
            a.manifest, a.out, samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes,
            prefix=a.prefix, derive_normals=a.derive_normals, depth_scale=a.depth_scale, source=a.source,
            skip_bad=a.skip_bad, overwrite=a.overwrite, progress=not a.quiet,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        return fail("make_shards", e)
    for line, key, reason in result["skipped"]:
        print(f"skipped line {line} ({key}): {reason}", file=sys.stderr)
    print(
        f"{result['num_samples']} samples in {len(result['sizes'])} shard(s) under {a.out} "
        f"({len(result['skipped'])} skipped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
