"""Fuzzing of the sample decoders: real members of every modality, and whole shard tars, mutated
(``mico_ds.data.fuzz_mutate``); a decoder must return tensors of the declared shapes or raise
:class:`~mico_ds.data.read.skips.SkipSample`, never anything else, with bounded memory
(docs/operations.md, "Bounded decoding and fuzzing").

The seed members are written by the project's own encoders (``mico_ds.data.write.media``; the shard
by ``mico_ds.data.write.tar``), so this module is where the read and the write paths meet, outside
both. tests/unit/data/test_fuzz_decode.py drives it with hypothesis (bounded in CI);
tools/fuzz_decoders.py runs it for a given time with seeded random mutations and reports::

    report = run_fuzz(seconds=60)      # inputs per kind, skips by reason, crashes, peak memory
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mico_ds import memory
from mico_ds.config import DecodeLimits, InputConfig
from mico_ds.data import schema
from mico_ds.data.fuzz_mutate import Op, apply_ops, random_ops
from mico_ds.data.read.decode import SampleDecoder
from mico_ds.data.read.plan import StreamPlan
from mico_ds.data.read.skips import SkipSample
from mico_ds.data.read.stream import ShardStream, StreamSpec

# Small geometry: the decoders' code paths, not their throughput, are under test.
FUZZ_INPUTS = InputConfig(image_size=32, num_frames=4, mel_bins=32, clip_frames=32, num_clips=2)
SHARD = "shard"  # the kind whose input is a whole tar


@dataclass(frozen=True)
class Seed:
    """One real member (or a whole tar, kind ``shard``) and the sample it sits in."""

    kind: str
    modality: str  # what the decoder is asked for ("image" for the caption members)
    ext: str  # the mutated member
    data: bytes
    sample: dict  # the other members of the sample (unmutated)


# ----------------------------------------------------------------------------- seeds


def _caption(**caps: str) -> bytes:
    return json.dumps({"captions": caps or {"vision": "a red square", "audio": "a hum"}}).encode()


def _video_with_audio(frames: np.ndarray, fps: int = 8, rate: int = 16000) -> bytes:
    """H.264 + AAC in MP4, the most common layout of crawled video (the writer makes video only)."""
    import av

    from mico_ds.data.write.media import mp4_codec

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", container_options={"fflags": "+bitexact"}) as c:
        v = c.add_stream(mp4_codec(), rate=fps)
        v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        v.codec_context.thread_count = 1
        a = c.add_stream("aac", rate=rate, layout="mono")
        for f in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        t = np.arange(rate * len(frames) // fps) / rate
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        af = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        af.sample_rate, af.pts = rate, 0
        for p in [*a.encode(af), *a.encode()]:
            c.mux(p)
    return buf.getvalue()


@functools.cache
def seeds() -> dict[str, Seed]:
    """The seed of every kind: image jpg/png/webp, video mp4 (H.264 + AAC)/webm/gif/frames, depth
    png/npy, normal png, audio flac/wav/mp3 and the AAC track of an mp4, json, txt, and an omni shard
    tar."""
    from PIL import Image

    from mico_ds.data.write import media

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)  # smooth: codecs keep it
    frames = np.stack([np.roll(rgb[:32, :32], 3 * i, axis=1) for i in range(8)])
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    depth = (1000 + 40 * xx + 10 * yy).astype(np.uint16)
    normals = media.normals_from_depth(depth.astype(np.float64) / 100)
    webp = io.BytesIO()
    Image.fromarray(rgb).save(webp, format="WEBP", quality=80)
    npy = io.BytesIO()
    np.save(npy, depth.astype(np.float32))
    caption = {"json": _caption()}
    members = {
        "image_jpg": ("image", "jpg", media.encode_jpeg(rgb)),
        "image_png": ("image", "png", media.encode_png(rgb)),
        "image_webp": ("image", "webp", webp.getvalue()),
        "video_mp4": ("video", "mp4", _video_with_audio(frames)),
        "audio_track": ("audio", "mp4", _video_with_audio(frames)),  # audio read from a video's track
        "video_webm": ("video", "webm", media.encode_video(frames, 8, "webm")),
        "video_gif": ("video", "gif", media.encode_video(frames, 8, "gif")),
        "video_frames": ("video", "frame0.jpg", media.encode_jpeg(frames[0])),
        "depth_png": ("depth", "depth.png", media.encode_png16(depth)),
        "depth_npy": ("depth", "depth.npy", npy.getvalue()),
        "normal_png": ("normal", "normal.png", media.encode_normal_png(normals)),
        "audio_flac": ("audio", "flac", media.encode_flac(wave)),
        "audio_wav": ("audio", "wav", media.encode_wav(np.stack([wave, -wave], 1), 22050)),
        "audio_mp3": ("audio", "mp3", media.encode_mp3(wave)),
        "json": ("image", "json", _caption(vision=["one", "two"], audio="x", subtitle="s", depth="d")),
        "txt": ("image", "txt", "a caption, with ünïcödé".encode()),
    }
    out: dict[str, Seed] = {}
    for kind, (modality, ext, data) in members.items():
        sample = dict(caption)
        if kind == "video_frames":  # frame0 is mutated; the other three stay as they are
            sample.update({f"frame{i}.jpg": media.encode_jpeg(frames[2 * i]) for i in range(1, 4)})
        if kind in ("json", "txt"):
            sample = {"jpg": members["image_jpg"][2]}
        out[kind] = Seed(kind, modality, ext, data, sample)
    omni = {name: members[kind][2] for kind, name in (("image_jpg", "jpg"), ("audio_flac", "flac"),
            ("depth_png", "depth.png"), ("normal_png", "normal.png"))}  # fmt: skip
    omni.update({"mp4": media.encode_mp4(frames[:4]), "json": _caption()})
    out[SHARD] = Seed(SHARD, "omni", "tar", _shard_bytes([("s0", omni), ("s1", omni)]), {})
    return out


def _shard_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    from mico_ds.data.write.tar import write_tar

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed-000000.tar"
        write_tar(path, samples)
        return path.read_bytes()


# ----------------------------------------------------------------------------- the oracle


def expected_shape(modality: str, inputs: InputConfig, train: bool) -> tuple[tuple[int, ...], torch.dtype]:
    """The declared (shape, dtype) of a decoded modality (docs/architecture.md, "Data contract")."""
    s = inputs.image_size
    frames = inputs.num_frames if train or inputs.eval_num_frames is None else inputs.eval_num_frames
    return {
        "image": ((3, s, s), torch.uint8),
        "video": ((frames, 3, s, s), torch.uint8),
        "audio": ((inputs.num_clips, 1, inputs.mel_bins, inputs.clip_frames), torch.float32),
        "depth": ((1, s, s), torch.float32),
        "normal": ((3, s, s), torch.uint8),
    }[modality]


class OracleError(AssertionError):
    """A decoder returned something other than the declared tensors."""


def check_output(out: dict, modalities: Sequence[str], inputs: InputConfig, train: bool) -> None:
    for m in modalities:
        shape, dtype = expected_shape(m, inputs, train)
        x = out[m]
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise OracleError(f"{m}: {tuple(x.shape)} {x.dtype}, declared {shape} {dtype}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise OracleError(f"{m}: non-finite values")


def decode_mutated(
    kind: str,
    ops: Sequence[Op],
    train: bool = False,
    limits: DecodeLimits | None = None,
    inputs: InputConfig = FUZZ_INPUTS,
    workdir: str | None = None,
) -> list[str]:
    """Decode the seed of ``kind`` mutated by ``ops``; returns the skip reasons met ([] when it
    decoded). Raises whatever else happened: that is a crash the fuzzer reports. A ``shard`` is read
    by a real worker stream (tar reading, decoding, batching), ``workdir`` holding the tar file."""
    seed = seeds()[kind]
    data = apply_ops(seed.data, ops)
    if kind == SHARD:
        return _stream_shard(data, train, limits, inputs, workdir)
    sample = {"__key__": f"fuzz-{kind}", **seed.sample, seed.ext: data}
    dec = SampleDecoder([seed.modality], inputs, train, limits=limits)
    try:
        out = dec(sample, np.random.default_rng(0) if train else None)
    except SkipSample as e:
        return [e.reason]
    check_output(out, dec.modalities, inputs, train)
    return []


def _stream_shard(
    data: bytes, train: bool, limits: DecodeLimits | None, inputs: InputConfig, workdir: str | None
) -> list[str]:
    lim = limits or DecodeLimits()
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = os.path.join(d, "fuzz-000000.tar")
        Path(path).write_bytes(data)
        plan = StreamPlan(urls=(path,), num_streams=1, shuffle=False, shuffle_buffer=0,
                          max_member_bytes=lim.member_bytes)  # fmt: skip
        spec = StreamSpec(corpus="fuzz", plan=plan, modalities=tuple(schema.MODALITIES), inputs=inputs,
                          batch_size=1, train=train, tokenizer=None, text_max_len=16, rank=0, workers=1,
                          positions=[(0, 0, 0)], infinite=False, drop_last=False, limits=lim)  # fmt: skip
        reasons: list[str] = []
        for msg in ShardStream(spec):
            if msg.error is not None:
                raise OracleError(f"worker error: {msg.error}")
            reasons += [r for r, n in (msg.stats or {}).get("skipped", {}).items() for _ in range(n)]
            if msg.batch is not None:
                sample = {m: msg.batch[m][0] for m in schema.MODALITIES}
                # collate made floats of the uint8 modalities; shapes are what is checked here
                for m in schema.MODALITIES:
                    shape, _ = expected_shape(m, inputs, train)
                    if tuple(sample[m].shape) != shape or not torch.isfinite(sample[m]).all():
                        raise OracleError(f"{m}: batch row {tuple(sample[m].shape)}, declared {shape}")
        return reasons


# ----------------------------------------------------------------------------- the runner


@dataclass
class FuzzReport:
    """What a fuzzing run tried and found (``as_dict`` is the JSON of tools/fuzz_decoders.py)."""

    seed: int
    inputs: Counter = field(default_factory=Counter)  # per kind
    decoded: Counter = field(default_factory=Counter)  # per kind, inputs that decoded
    skips: Counter = field(default_factory=Counter)  # per reason
    crashes: int = 0
    crash_examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    max_input_rss_growth_bytes: int = 0  # the most one input raised the peak above the resident set
    max_input_rss_growth_input: dict = field(default_factory=dict)  # kind, train, ops: to reproduce it
    slowest_input_s: float = 0.0
    slowest_input_kind: str = ""

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "inputs_tried": sum(self.inputs.values()),
            "inputs": dict(sorted(self.inputs.items())),
            "decoded": dict(sorted(self.decoded.items())),
            "skips": dict(self.skips.most_common()),
            "crashes": self.crashes,
            "crash_examples": self.crash_examples,
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
            "max_input_rss_growth_mib": round(self.max_input_rss_growth_bytes / 2**20, 1),
            "max_input_rss_growth_input": self.max_input_rss_growth_input,
            "slowest_input_s": round(self.slowest_input_s, 3),
            "slowest_input_kind": self.slowest_input_kind,
        }


def _can_reset_peak() -> bool:
    try:
        memory.reset_peak_rss()
        return bool(memory.proc_status(("VmHWM",)))
    except OSError:
        return False


def run_fuzz(
    seconds: float | None = 60.0,
    examples: int | None = None,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
    limits: DecodeLimits | None = None,
    max_crash_examples: int = 10,
) -> FuzzReport:
    """Mutate the seeds of ``kinds`` (default all) in turn, each input in eval and train mode
    alternately, until ``seconds`` pass or ``examples`` inputs are tried (whichever first)."""
    if seconds is None and examples is None:
        raise ValueError("give seconds or examples (or both)")
    kinds = list(kinds or seeds())
    unknown = [k for k in kinds if k not in seeds()]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {list(seeds())}")
    rng = np.random.default_rng(seed)
    report = FuzzReport(seed=seed)
    per_input_peak = _can_reset_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mico-fuzz-") as work:
        i = 0
        while (examples is None or i < examples) and (seconds is None or time.perf_counter() - t0 < seconds):
            kind, train, ops = kinds[i % len(kinds)], bool((i // len(kinds)) % 2), random_ops(rng)
            i += 1
            report.inputs[kind] += 1
            before = memory.proc_status(("VmRSS",)).get("VmRSS", 0)
            if per_input_peak:
                memory.reset_peak_rss()
            start = time.perf_counter()
            try:
                reasons = decode_mutated(kind, ops, train, limits, workdir=work)
            except Exception as e:  # noqa: BLE001 - every other exception is what the fuzzer looks for
                report.crashes += 1
                if len(report.crash_examples) < max_crash_examples:
                    report.crash_examples.append({
                        "kind": kind, "train": train, "ops": [list(o) for o in ops],
                        "error": f"{type(e).__name__}: {e}"[:500],
                        "where": traceback.format_exception(e)[-2].strip()[:500],
                    })  # fmt: skip
                continue
            finally:
                took = time.perf_counter() - start
                if took > report.slowest_input_s:
                    report.slowest_input_s, report.slowest_input_kind = took, kind
                peak = memory.proc_status(("VmHWM",)).get("VmHWM", 0)  # this input's (when reset)
                report.peak_rss_bytes = max(report.peak_rss_bytes, peak)
                if per_input_peak and peak - before > report.max_input_rss_growth_bytes:
                    report.max_input_rss_growth_bytes = peak - before
                    worst = {"kind": kind, "train": train, "ops": [list(o) for o in ops]}
                    report.max_input_rss_growth_input = worst
            report.skips.update(reasons)
            if not reasons:
                report.decoded[kind] += 1
    report.seconds = time.perf_counter() - t0
    return report
