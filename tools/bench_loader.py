#!/usr/bin/env python
"""Data-loader throughput: samples/s per core of mico_ds's pipeline, against the canonical minimal one.

Image-text (224 px, training augmentation, tokenized captions) is compared in the same run, on the
same shards, with the same process count, to what a user would otherwise write:

    webdataset.WebDataset(urls).decode("pil").to_tuple("jpg", "txt")
      + open_clip.image_transform(224, is_train=True) + the same tokenizer, batched in the workers

Both deliver what the model consumes (normalized float tensors + token ids). Audio (clips/s) and video
(clips/s, from MP4 and from pre-extracted frames) are measured for mico_ds alone.

    python tools/bench_loader.py                       # 1 core: in-process loading, 1 torch thread
    python tools/bench_loader.py --workers 2           # 2 worker processes (figures per worker process)
    python tools/bench_loader.py --only image --json out.json
    python tools/bench_loader.py --only plan           # the loader at scale: 100,000 shards, 64 x 8 streams

The planning case (--only plan) needs no media: StreamPlan only needs URL strings. It times the brace
expansion and expand_urls of 100,000 shard URLs (empty files, for the existence checks), the plan,
one stream's epoch shards and chunks (a worker's start-up) and all 512 streams'; it reports the spread
of shards and of samples per stream (per-shard sizes drawn from an assumed distribution), the
fewer-shards-than-streams case (every stream reads every shard, keeps every n-th sample: the read
amplification, measured on real small shards), and sizing 100,000 shards from sizes.json, from
*_stats.json and by opening tars (measured on --plan-real-shards real shards, extrapolated).

Benchmark shards are generated once under --data (photo-like JPEGs of 256-512 px, 10 s 16 kHz FLAC,
5 s 25 fps 320x240 H.264 MP4 + 8 pre-extracted 320x240 JPEG frames) with mico_ds.data.write.media and
mico_ds.data.write.tar. Timings exclude a warm-up of a few batches (worker start, imports).
"""

from __future__ import annotations

import argparse
import dataclasses
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


# ----------------------------------------------------------------------------- the loader at scale


def draw_sizes(n: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    """Samples per shard, an assumed distribution (no real corpus is measured here):

    ``img2dataset``: 10,000 URLs asked per shard, each shard's success rate p ~ Beta(17, 3) (mean 0.85,
    sd 0.08: rates differ with the hosts a shard's URLs hit), n ~ Binomial(10000, p).
    ``clips``: video clips per shard, lognormal (median 1,000, sigma 0.5): heavy tailed, as clips per
    video vary with the videos' lengths and cuts.
    """
    if kind == "img2dataset":
        return rng.binomial(10_000, rng.beta(17, 3, n))
    if kind == "clips":
        return np.maximum(1, np.round(rng.lognormal(np.log(1000), 0.5, n))).astype(np.int64)
    raise ValueError(f"unknown size distribution {kind!r}")


def spread(values: list[int] | np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "min": int(v.min()), "max": int(v.max()), "mean": float(v.mean()), "sum": int(v.sum()),
        "max_over_min": float(v.max() / max(v.min(), 1)), "cv": float(v.std() / max(v.mean(), 1e-12)),
    }  # fmt: skip


def _clock(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def _make_files(d: Path, names: list[str], text: str | None = None) -> None:
    """Create ``names`` under ``d`` (empty, or ``text``) once; a marker records how many."""
    marker = d / ".complete"
    if marker.exists() and marker.read_text() == str(len(names)):
        return
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        with open(d / name, "w") as f:
            if text is not None:
                f.write(text)
    marker.write_text(str(len(names)))


def _make_real_shards(d: Path, n: int, samples: int) -> list[str]:
    """``n`` real tar shards of ``samples`` samples (a 1-3 KB ``jpg`` + a ``txt`` each; never decoded)."""
    from mico_ds.data.write.tar import write_tar

    names = [f"real-{i:06d}.tar" for i in range(n)]
    marker = d / ".complete"
    if not (marker.exists() and marker.read_text() == f"{n}x{samples}"):
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        for i, name in enumerate(names):
            members = [{"jpg": rng.bytes(int(rng.integers(1000, 3000))), "txt": caption(rng).encode()}
                       for _ in range(samples)]  # fmt: skip
            write_tar(d / name, [(f"s{i:06d}_{j:05d}", m) for j, m in enumerate(members)])
        marker.write_text(f"{n}x{samples}")
    return [str(d / name) for name in names]


def _per_stream(plan, sizes: dict[str, int], epoch: int = 0) -> tuple[list[int], list[int], float, float]:
    """Shards and samples per stream in one epoch, from the plan itself; the time of one stream's and of
    all streams' ``chunks`` (what each worker computes at its start and at every epoch)."""
    shards, samples = [], []
    t0 = time.perf_counter()
    first = 0.0
    for s in range(plan.num_streams):
        mine = [u for chunk in plan.chunks(s, epoch) for u in chunk]
        if s == 0:
            first = time.perf_counter() - t0
        shards.append(len(mine))
        samples.append(sum(sizes[u] for u in mine))
    return shards, samples, first, time.perf_counter() - t0


def _kept_by_sample(plan, sizes: dict[str, int], epoch: int = 0) -> np.ndarray:
    """Samples each stream keeps in ``epoch`` when every stream reads every shard
    (``plan.split_by_sample``): the arithmetic of ``StreamPlan.raw_chunk``, the run-wide item g kept
    by stream g % n, the epoch's items starting at ``epoch`` x (items per epoch)."""
    n = plan.num_streams
    total = sum(sizes[u] for u in plan.epoch_shards(0, epoch))
    first = epoch * total % n
    return total // n + ((np.arange(n) - first) % n < total % n).astype(np.int64)


def _resampled(urls: list[str], streams: int, sizes: dict[str, int], seed: int) -> dict:
    """One epoch of a resampled plan (``data.corpora[].resampled``): each stream draws its block of
    shards with replacement and reads each whole, so nothing read is dropped; what it costs instead is
    coverage (shards drawn several times, others not at all in the epoch)."""
    from collections import Counter

    from mico_ds.data.read.plan import StreamPlan, salt_of

    plan = StreamPlan(tuple(urls), num_streams=streams, seed=seed, salt=salt_of("c"), resampled=True)
    draws: Counter = Counter()
    samples = []
    t0 = time.perf_counter()
    for s in range(streams):
        mine = [u for chunk in plan.chunks(s, 0) for u in chunk]
        draws.update(mine)
        samples.append(sum(sizes[u] for u in mine))
    drawn = np.array([draws.get(u, 0) for u in urls])
    return {
        "draws_per_stream": plan.draws_per_epoch, "all_streams_chunks_s": time.perf_counter() - t0,
        "samples_per_stream": spread(samples), "draws_per_shard": spread(drawn),
        "shards_not_drawn_fraction": float((drawn == 0).mean()),
        "kept_fraction": 1.0, "read_amplification": 1,
    }  # fmt: skip


def plan_case(root: Path, urls_n: int = 100_000, ranks: int = 64, workers: int = 8, few: int = 300,
              real_shards: int = 200, real_samples: int = 100, seed: int = 0) -> dict:  # fmt: skip
    """The loader's start-up and balance at scale (see the module docstring); every figure as a dict."""
    from mico_ds.data.io import _braceexpand, expand_urls
    from mico_ds.data.read.plan import StreamPlan, salt_of
    from mico_ds.data.sizing import corpus_sizes, count_shards
    from mico_ds.data.write.tar import write_sizes

    streams = ranks * workers
    rng = np.random.default_rng(seed)
    has_resampled = "resampled" in {fl.name for fl in dataclasses.fields(StreamPlan)}
    res: dict = {"urls": urls_n, "ranks": ranks, "workers_per_rank": workers, "streams": streams}
    d = root / f"plan_{urls_n}"
    names = [f"shard-{i:06d}.tar" for i in range(urls_n)]
    pattern = str(d / f"shard-{{{0:06d}..{urls_n - 1:06d}}}.tar")
    _make_files(d, names)
    t: dict = {}
    _, t["brace_expand_s"] = _clock(_braceexpand, pattern)
    urls, t["expand_urls_s"] = _clock(expand_urls, pattern)  # + an existence check per URL (os.stat)
    plan, t["plan_s"] = _clock(StreamPlan, tuple(urls), num_streams=streams, seed=seed, salt=salt_of("c"))
    res["startup"] = t
    res["per_worker_chunks_s"] = None
    for kind in ("img2dataset", "clips"):
        sizes = dict(zip(urls, draw_sizes(urls_n, rng, kind).tolist()))
        shards, samples, first, total = _per_stream(plan, sizes)
        res["per_worker_chunks_s"] = res["per_worker_chunks_s"] or first
        res["all_streams_chunks_s"] = total
        per_shard = spread(list(sizes.values()))
        res[f"balance_{kind}"] = {"samples_per_shard": per_shard, "shards_per_stream": spread(shards),
                                  "samples_per_stream": spread(samples)}  # fmt: skip
        if kind == "img2dataset":
            write_sizes(d, {os.path.basename(u): n for u, n in sizes.items()})
            if has_resampled:
                res["balance_img2dataset"]["resampled"] = _resampled(urls, streams, sizes, seed)
    # Sizing 100,000 shards: sizes.json (one file), *_stats.json (a file per shard), opening tars.
    sz: dict = {}
    known, sz["sizes_json_s"] = _clock(corpus_sizes, urls, open_missing=False)
    assert known.complete and known.by_source() == {"sizes.json": urls_n}
    sd = root / f"plan_{urls_n}_stats"
    _make_files(
        sd, [n.replace(".tar", "_stats.json") for n in names], json.dumps({"count": 10000, "successes": 8500})
    )
    stats_urls = [str(sd / n) for n in names]
    known, sz["stats_json_s"] = _clock(corpus_sizes, stats_urls, open_missing=False)
    assert known.complete and known.by_source() == {"*_stats.json": urls_n}
    real = _make_real_shards(root / f"plan_real_{real_shards}x{real_samples}", real_shards, real_samples)
    (counts, errors), serial = _clock(count_shards, real)
    assert not errors and set(counts.values()) == {real_samples}, (errors, set(counts.values()))
    (_, _), parallel = _clock(count_shards, real, workers=2)
    per_shard_s, members = serial / real_shards, 2 * real_samples
    mean_samples = res["balance_img2dataset"]["samples_per_shard"]["mean"]
    sz.update({
        "real_shards": real_shards, "real_samples_per_shard": real_samples, "members_per_sample": 2,
        "opened_serial_s": serial, "opened_2_processes_s": parallel,
        "per_member_header_us": per_shard_s / members * 1e6,
        # linear in member headers (one header read and one seek per member): extrapolated, not measured
        "extrapolated_all_opened_1_process_h": per_shard_s / members * 2 * mean_samples * urls_n / 3600,
        "extrapolated_assumes": f"{urls_n} shards x {mean_samples:.0f} samples x 2 members, page cache warm",
    })  # fmt: skip
    res["sizing"] = sz
    # Fewer shards than streams: every stream reads every shard and keeps every n-th sample.
    few_urls = urls[:few]
    few_plan = StreamPlan(tuple(few_urls), num_streams=streams, seed=seed, salt=salt_of("c"))
    few_sizes = dict(zip(few_urls, draw_sizes(few, rng, "img2dataset").tolist()))
    kept = _kept_by_sample(few_plan, few_sizes)
    assert few_plan.split_by_sample and int(kept.sum()) == sum(few_sizes.values())
    read_per_stream = sum(few_sizes.values())
    # The same shards holding 100 samples each: a chunk (shards_per_chunk shards) then has fewer items
    # than there are streams; the run-wide index (StreamPlan.raw_chunk) still spreads them evenly.
    small = _kept_by_sample(few_plan, dict.fromkeys(few_urls, 100))
    f: dict = {
        "shards": few, "split_by_sample": few_plan.split_by_sample,
        "samples_kept_per_stream": spread(kept), "samples_read_per_stream": read_per_stream,
        "kept_fraction": float(kept.mean() / read_per_stream), "read_amplification": streams,
        "shards_of_100_samples": {"samples_kept_per_stream": spread(small),
                                  "streams_keeping_nothing": int((small == 0).sum())},
    }  # fmt: skip
    # What it costs, on real shards: one stream reading them all to keep 1/n, against reading its share.
    rplan = StreamPlan(tuple(real), num_streams=streams, shuffle=False, shards_per_chunk=4)
    t0 = time.perf_counter()
    got = sum(1 for _ in rplan.items(0, (0, 0, 0), infinite=False))
    split_s = time.perf_counter() - t0
    one = StreamPlan(tuple(real), num_streams=1, shuffle=False, shards_per_chunk=4)
    t0 = time.perf_counter()
    read_all = sum(1 for _ in one.items(0, (0, 0, 0), infinite=False))
    whole_s = time.perf_counter() - t0
    real_kept = _kept_by_sample(rplan, dict.fromkeys(real, real_samples))
    f["measured_on_real_shards"] = {
        "shards": real_shards, "samples": read_all, "bytes": sum(os.path.getsize(u) for u in real),
        "kept_by_stream_0": got, "kept_per_stream": spread(real_kept),
        "streams_keeping_nothing": int((real_kept == 0).sum()),
        "seconds_to_read_them_all": whole_s, "seconds_for_stream_0_share": split_s,
        "raw_samples_per_s_read": read_all / whole_s,
        # what one kept sample costs a stream at the mean share (samples / streams), all shards read
        "seconds_per_kept_sample_at_mean_share": split_s / (read_all / streams),
    }  # fmt: skip
    f["resampled"] = (
        _resampled(few_urls, streams, few_sizes, seed)
        if has_resampled
        else "not measured: StreamPlan has no resampled field at this commit"
    )
    res["fewer_shards_than_streams"] = f
    return res


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
        .repeat()  # endless like ours (webdataset 1.0 ignores WebDataset(repeat=True)): runs past one epoch
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
    p.add_argument(
        "--only", default="image,audio,video", help="comma-separated subset of image,audio,video,plan"
    )
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=2, help="alternate ours/reference this many times (image)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    g = p.add_argument_group("the planning case (--only plan)")
    g.add_argument("--plan-urls", type=int, default=100_000, help="shard URLs (%(default)s)")
    g.add_argument("--plan-ranks", type=int, default=64, help="ranks (%(default)s)")
    g.add_argument("--plan-workers", type=int, default=8, help="data-loader workers per rank (%(default)s)")
    g.add_argument(
        "--plan-few", type=int, default=300, help="shards of the fewer-than-streams case (%(default)s)"
    )
    g.add_argument(
        "--plan-real-shards", type=int, default=200, help="real shards opened for sizing (%(default)s)"
    )
    g.add_argument("--plan-real-samples", type=int, default=100, help="samples per real shard (%(default)s)")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"image", "audio", "video", "plan"}
    if unknown:
        p.error(f"--only: unknown case(s) {sorted(unknown)}; choose from image,audio,video,plan")
    torch.set_num_threads(1)  # per-core figures: no intra-op threads in the measuring process
    root = Path(args.data)
    if only - {"plan"}:
        make_bench_shards(root, n_image=1024, n_audio=256, n_video=128)
    tok = str(root / "tokenizer" / "tokenizer.model")
    cores = max(1, args.workers)
    cmd = " ".join(["python", "tools/bench_loader.py", *(argv if argv is not None else sys.argv[1:])])
    res: dict = {"machine": machine(), "workers": args.workers, "cores_used": cores, "command": cmd}
    if "plan" in only:
        res["plan"] = plan_case(root, args.plan_urls, args.plan_ranks, args.plan_workers, args.plan_few,
                                args.plan_real_shards, args.plan_real_samples)  # fmt: skip

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
            # with --workers N the figures are per worker process (N processes, the same N on both sides)
            "samples_per_s_per_core": best["mico_ds"] / cores,
            "reference_samples_per_s_per_core": best["reference"] / cores,
            "samples_per_s_per_worker": best["mico_ds"] / cores,
            "reference_samples_per_s_per_worker": best["reference"] / cores,
            "ratio": best["mico_ds"] / best["reference"],
            # a shared machine: the best runs are compared, the medians are the check on that
            "ratio_of_medians": float(np.median(runs["mico_ds"]) / np.median(runs["reference"])),
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
