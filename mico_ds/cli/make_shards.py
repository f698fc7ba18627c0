"""Turn a raw-media manifest (JSON lines), or a corpus in its published layout (--format), into
WebDataset tar shards + sizes.json.

    python tools/make_shards.py --manifest raw/manifest.jsonl --out data/mycorpus --prefix mycorpus
    python tools/make_shards.py --manifest m.jsonl --out shards --samples-per-shard 500 \\
        --max-shard-bytes 1GB --derive-normals
    python tools/make_shards.py --format vast27m --annotations vast27m/annotations/*.json \\
        --media-root vast27m/videos --out data/vast27m --workers 32

--format F reads a corpus's own annotation files (the formats are listed below) and finds or cuts its
media under --media-root, in --workers processes. Skipped records are named (FILE:LINE: key: reason)
in OUT/skipped.txt, remarks in OUT/notes.txt; more skips than --max-skip fail the run (exit 1) with the
shards kept. A stopped run continues where it stopped when rerun with the same arguments
(OUT/ingest.json); --overwrite starts over.

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

MANIFEST = "manifest"
MANIFEST_ONLY = ("derive_normals", "skip_bad")  # flags of the manifest path only


def byte_size(text: str) -> int:
    """argparse type: '500MB', '1GB', '1GiB', '1048576' -> bytes (decimal units unless ...iB)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _formats_epilog() -> tuple[list[str], str]:
    from mico_ds.data.write import formats

    found = formats.available()
    lines = [f"  {MANIFEST:<14} a raw-media manifest (--manifest; the default)"]
    lines += [f"  {name:<14} {fmt.help}" for name, fmt in found.items()]
    return [MANIFEST, *found], "formats (--format):\n" + "\n".join(lines) + "\n\nSee docs/data.md."


def main(argv: list[str] | None = None) -> int:
    names, epilog = _formats_epilog()
    p = argparse.ArgumentParser(
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--format", default=MANIFEST, choices=names, metavar="F", help="input layout (manifest)")
    p.add_argument("--manifest", help="JSON-lines manifest (--format manifest)")
    p.add_argument(
        "--annotations", nargs="+", metavar="FILE", help="the corpus's annotation files (--format F)"
    )
    p.add_argument("--media-root", metavar="DIR", help="where the corpus's media files are (--format F)")
    p.add_argument("--split", default=None, help="split of formats whose annotation files hold several")
    p.add_argument("--workers", type=int, default=None, help="worker processes (--format F; CPU count)")
    p.add_argument(
        "--max-skip", default=None,
        help="--format F: skipped records allowed, a count (100) or a fraction (0.05) (0.1)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory for the shards and sizes.json")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="max samples per shard (%(default)s)")
    p.add_argument(
        "--max-shard-bytes", type=byte_size, default=None, help="max shard size, e.g. 1GB or 1GiB (none)"
    )
    p.add_argument("--prefix", default=None, help="shard name prefix: PREFIX-000000.tar (corpus / F)")
    p.add_argument("--derive-normals", action="store_true", help="write normal.png from depth when missing")
    p.add_argument(
        "--depth-scale", type=float, default=1.0,
        help="for --derive-normals: pixels per depth unit, e.g. 0.032 if 64 px span 2000 mm (%(default)s)",
    )  # fmt: skip
    p.add_argument("--source", default=None, help="json 'source' of the samples (manifest name / F)")
    p.add_argument("--skip-bad", action="store_true", help="skip samples with unreadable files; report them")
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.format == MANIFEST:
        if not a.manifest:
            p.error("--manifest is required (or --format F with --annotations)")
        ingest_flags = [
            f for f in ("annotations", "media_root", "split", "workers", "max_skip") if getattr(a, f)
        ]
        if ingest_flags:
            p.error(f"--{ingest_flags[0].replace('_', '-')} needs --format F (not the manifest)")
        return _manifest(a)
    if a.manifest:
        p.error(f"--manifest is for --format manifest; --format {a.format} takes --annotations")
    bad = [f for f in MANIFEST_ONLY if getattr(a, f)]
    if bad:
        p.error(f"--{bad[0].replace('_', '-')} is for --format manifest only")
    return _ingest(a)


def _manifest(a: argparse.Namespace) -> int:
    try:
        result = make_shards(
            a.manifest, a.out, samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes,
            prefix=a.prefix or "corpus", derive_normals=a.derive_normals, depth_scale=a.depth_scale,
            source=a.source, skip_bad=a.skip_bad, overwrite=a.overwrite, progress=not a.quiet,
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


def _ingest(a: argparse.Namespace) -> int:
    from mico_ds.data.write.ingest import DEFAULT_MAX_SKIP, TooManySkipped, ingest

    try:  # ingest() says when the format needs --annotations (imagefolder does not)
        r = ingest(
            a.format, a.annotations or [], a.out, media_root=a.media_root, split=a.split, source=a.source,
            prefix=a.prefix, samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes,
            workers=a.workers, max_skip=a.max_skip or DEFAULT_MAX_SKIP, overwrite=a.overwrite,
            progress=not a.quiet,
        )  # fmt: skip
    except TooManySkipped as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_shards: interrupted; rerun the same command to continue after the last complete shard",
              file=sys.stderr)  # fmt: skip
        return 130
    except (ValueError, OSError) as e:
        return fail("make_shards", e)
    if r["upstream"]:
        print("upstream counts: " + ", ".join(f"{k} {v}" for k, v in r["upstream"].items()))
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["skip_kinds"].items()))
    state = "already complete: " if r["complete_before"] else ""
    print(
        f"{state}{r['num_samples']} samples in {len(r['sizes'])} shard(s) under {a.out} "
        f"({r['skipped']} skipped{': ' + kinds if kinds else ''}, see {r['report']['skipped']}; "
        f"{r['notes']} notes in {r['report']['notes']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
