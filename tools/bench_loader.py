#!/usr/bin/env python
"""Data-loader throughput: samples/s per core of mico_ds's pipeline, against the canonical minimal one.

Image-text (224 px, training augmentation, tokenized captions) is compared in the same run, on the
same shards, with the same process count, to what a user would otherwise write:

    webdataset.WebDataset(urls).decode("pil").to_tuple("jpg", "txt")
      + open_clip.image_transform(224, is_train=True) + the same tokenizer, batched in the workers

Both deliver what the model consumes (normalized float tensors + token ids). Audio (clips/s) and video
(clips/s, from MP4 and from pre-extracted frames) are measured for mico_ds alone.

    python tools/bench_loader.py                       # 1 core: in-process loading, 1 torch thread
    python tools/bench_loader.py --workers 2           # 2 worker processes (figures divided by 2)
    python tools/bench_loader.py --only image --json out.json

Benchmark shards are generated once under --data (photo-like JPEGs of 256-512 px, 10 s 16 kHz FLAC,
5 s 25 fps 320x240 H.264 MP4 + 8 pre-extracted 320x240 JPEG frames) with mico_ds.data.write.media and
mico_ds.data.write.tar. Timings exclude a warm-up of a few batches (worker start, imports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mico_ds.config import CorpusConfig, DataConfig, InputConfig
from mico_ds.data import schema
from mico_ds.data.read.loader import CorpusLoader
from mico_ds.data.tokenizer import resolve_tokenizer

WORDS = (
    "a", "the", "dog", "cat", "man", "woman", "child", "car", "street", "tree", "house", "river",
    "mountain", "sky", "beach", "city", "night", "red", "blue", "green", "small", "large", "old",
    "young", "running", "sitting", "playing", "walking", "standing", "next", "to", "in", "on", "with",
)  # fmt: skip
BENCH_VERSION = 1


# ----------------------------------------------------------------------------- shard generation


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 (h, w, 3) image: noise octaves with a ~1/f spectrum (JPEG cost like photos)."""
    from PIL import Image

    acc = np.zeros((h, w, 3), np.float32)
    for k in (4, 8, 16, 32, 64, 128, 256):
        small = (rng.random((k, k, 3)) * 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        acc += up * (k**-0.6)
    acc -= acc.min()
    return (acc * (255.0 / max(acc.max(), 1e-6))).astype(np.uint8)


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(8, 20))))


def _write(out: Path, prefix: str, samples: list[tuple[str, dict[str, bytes]]], per_shard: int) -> None:
    from mico_ds.data.write.tar import write_sizes, write_tar

    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(0, len(samples), per_shard):
        name = f"{prefix}-{s // per_shard:06d}.tar"
        sizes[name] = write_tar(out / name, samples[s : s + per_shard])
    write_sizes(out, sizes)


def make_bench_shards(root: Path, n_image: int, n_audio: int, n_video: int) -> None:
    """Generate the benchmark shards (once; a marker file records the parameters)."""
    from mico_ds.data.tokenizer import train_sentencepiece
    from mico_ds.data.write import media

    marker = root / "bench.json"
    params = {"version": BENCH_VERSION, "image": n_image, "audio": n_audio, "video": n_video}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    caps = []
    img = []
    for i in range(n_image):
        short = int(rng.integers(256, 513))
        aspect = rng.uniform(0.75, 1.34)
        h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
        caps.append(caption(rng))
        img.append(
            (f"img{i:06d}", {"jpg": media.encode_jpeg(photo(rng, h, w), 90), "txt": caps[-1].encode()})
        )
    _write(root / "image_text", "train", img, 256)
    aud = []
    for i in range(n_audio):
        t = np.arange(160000) / 16000
        f0 = rng.uniform(100, 2000)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * np.sin(t))) + 0.05 * rng.standard_normal(t.size)
        meta = {"captions": {"audio": caption(rng)}}
        caps.append(meta["captions"]["audio"])
        aud.append(
            (
                f"aud{i:06d}",
                {"flac": media.encode_flac(wave.astype(np.float32)), "json": json.dumps(meta).encode()},
            )
        )
    _write(root / "audio_text", "train", aud, 64)
    mp4, frames = [], []
    for i in range(n_video):
        base = photo(rng, 240, 448)
        clip = np.stack([base[:, t : t + 320] for t in range(125)])  # 5 s at 25 fps, panning right
        meta = json.dumps({"captions": {"vision": caption(rng)}}).encode()
        mp4.append((f"vid{i:06d}", {"mp4": media.encode_mp4(clip, fps=25), "json": meta}))
        idx = np.linspace(0, 125, 9)[:-1].astype(int) + 7  # 8 frames, as tools/make_shards would extract
        members = {f"frame{j}.jpg": media.encode_jpeg(clip[k], 90) for j, k in enumerate(idx)}
        frames.append((f"vid{i:06d}", {**members, "json": meta}))
    _write(root / "video_mp4", "train", mp4, 32)
    _write(root / "video_frames", "train", frames, 32)
    train_sentencepiece(caps, root / "tokenizer", vocab_size=400)
    marker.write_text(json.dumps(params))
    print(f"generated benchmark shards under {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# ----------------------------------------------------------------------------- timing


def timed(it, warmup: int, batches: int, count) -> dict:
    for _ in range(warmup):
        next(it)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        n += count(next(it))
    wall = time.perf_counter() - t0
    return {"items": n, "seconds": wall, "per_s": n / wall, "main_cpu_s": time.process_time() - c0}


def ours(root: Path, corpus: str, modalities: list[str], inputs: InputConfig, bs: int, workers: int, tok):
    data = DataConfig(root=str(root), tokenizer=tok, text_max_len=64, num_workers=workers,
                      shuffle_buffer=64, shards_per_chunk=2)  # fmt: skip
    c = CorpusConfig(name=corpus, shards=f"{corpus}/train-*.tar", modalities=modalities, batch_size=bs)
    return CorpusLoader(c, inputs, data, seed=0, rank=0, world_size=1)


def reference_image(root: Path, bs: int, workers: int, tok: str):
    """webdataset + OpenCLIP transform + tokenizer, batched in the workers (the canonical script)."""
    import open_clip
    import webdataset as wds

    urls = sorted(str(p) for p in (root / "image_text").glob("train-*.tar"))
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = resolve_tokenizer(tok)

    def collate(samples):
        imgs, texts = zip(*samples)
        ids, mask = tokenizer.encode(list(texts), 64)
        return torch.stack(imgs), ids, mask

    ds = (
        wds.WebDataset(urls, shardshuffle=False, repeat=True, nodesplitter=None, empty_check=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(preprocess, lambda t: t)
        .batched(bs, collation_fn=collate)
    )
    if workers == 0:
        return iter(ds)
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_1m_before": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", default="/tmp/mico_bench", help="where benchmark shards are generated / reused")
    p.add_argument(
        "--workers", type=int, default=0, help="data-loader worker processes (0: in-process, 1 core)"
    )
    p.add_argument("--only", default="image,audio,video", help="comma-separated subset of image,audio,video")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=2, help="alternate ours/reference this many times (image)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    torch.set_num_threads(1)  # per-core figures: no intra-op threads in the measuring process
    root = Path(args.data)
    make_bench_shards(root, n_image=1024, n_audio=256, n_video=128)
    tok = str(root / "tokenizer" / "tokenizer.model")
    cores = max(1, args.workers)
    cmd = " ".join(["python", "tools/bench_loader.py", *(argv if argv is not None else sys.argv[1:])])
    res: dict = {"machine": machine(), "workers": args.workers, "cores_used": cores, "command": cmd}

    def count(b) -> int:
        return len(b[schema.KEYS]) if isinstance(b, dict) else len(b[0])

    if "image" in only:
        inp = InputConfig(image_size=224)
        runs = {"mico_ds": [], "reference": []}
        for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
            it = ours(root, "image_text", ["image"], inp, 32, args.workers, tok)
            runs["mico_ds"].append(timed(it, args.warmup, args.batches, count)["per_s"])
            it.close()
            ref = reference_image(root, 32, args.workers, tok)
            runs["reference"].append(timed(ref, args.warmup, args.batches, count)["per_s"])
            del ref
        best = {k: max(v) for k, v in runs.items()}
        res["image"] = {
            "samples_per_s_per_core": best["mico_ds"] / cores,
            "reference_samples_per_s_per_core": best["reference"] / cores,
            "ratio": best["mico_ds"] / best["reference"],
            "runs": runs,
        }
    if "audio" in only:
        inp = InputConfig()  # 16 kHz, 64 mel bins, 1 clip of 512 frames (MiCo's audio processor)
        it = ours(root, "audio_text", ["audio"], inp, 16, args.workers, tok)
        r = timed(it, args.warmup, args.batches, count)
        it.close()
        res["audio"] = {"clips_per_s_per_core": r["per_s"] * inp.num_clips / cores, **r}
    if "video" in only:
        inp = InputConfig(image_size=224, num_frames=8)
        for name in ("video_mp4", "video_frames"):
            it = ours(root, name, ["video"], inp, 8, args.workers, tok)
            r = timed(it, args.warmup, max(4, args.batches // 2), count)
            it.close()
            res[name] = {"clips_per_s_per_core": r["per_s"] / cores, **r}
    res["machine"]["load_1m_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
