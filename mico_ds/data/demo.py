"""The built-in demo corpus: seeded synthetic omni-modal samples whose captions describe what they show.

Nothing is downloaded. Each omni sample is a coloured shape moving across a plain grey background:

    image   the middle frame (JPEG)              video  T frames of the motion (MP4, + frame{i}.jpg)
    depth   16-bit PNG in millimetres: the shape is a dome in front of or behind a flat wall
    normal  PNG normals derived from that depth  audio  FLAC, 16 kHz mono tone or beeps
    json    {"captions": {"vision", "audio", "subtitle", "depth"}, "category": <shape>, "source",
             "qa": [{"q", "a", "type"}, ...]}   (omni only; see qa_for)

Every caption word is grounded in the media:
    vision   "a small red star moves left along the top"        (size, colour, shape, direction, lane)
    audio    "three loud high buzzing beeps"                     (count/steady, loudness, pitch, timbre)
    subtitle "can you hear three beeps? the red star is going left"
    depth    "the star is close to the camera"                   (nearer / farther than the wall)

The attribute space has 2*8*8*4*3 vision x 3*6*2*2 audio x 3 subtitle x 2 depth = 663,552 distinct
concatenated captions. The held-out ``val`` split draws distinct attribute tuples (so its concatenated
captions are unique, for retrieval evaluation) and ``train`` never uses a ``val`` tuple. Three
single-pair corpora exercise corpus mixing and joined samples (MiCo Eq. 3): ``image_text`` (jpg + txt,
the img2dataset/OpenCLIP layout), ``audio_text`` (flac + json) and ``video_text`` (mp4 + json).

Layout under ``out_dir``::

    omni/train-000000.tar ...  omni/val-000000.tar ...  omni/sizes.json
    image_text/train-*.tar  audio_text/train-*.tar  video_text/train-*.tar   (each with sizes.json)
    tokenizer/tokenizer.model   SentencePiece (Llama-2 settings) trained on all captions
    demo.json                   parameters, counts, shard patterns; written last (= corpus complete)

Every random choice comes from ``numpy.random.default_rng([seed, corpus, split, index])``, so the
shards are byte-identical for one seed whatever the number of worker processes.
"""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mico_ds.data import schema
from mico_ds.data.media import (
    encode_flac,
    encode_jpeg,
    encode_mp4,
    encode_normal_png,
    encode_png16,
    normals_from_depth,
)
from mico_ds.data.shards import shard_pattern, write_json_atomic, write_sizes, write_tar

FORMAT_VERSION = 2  # 2: omni json members carry "qa" (media and captions unchanged from 1)
INDEX_FILE = "demo.json"
LOCK_FILE = ".demo.lock"

# ----------------------------------------------------------------------------- attribute space

SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS: dict[str, float] = {"small": 0.12, "large": 0.22}  # fraction of the image side
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
LANES: tuple[int, ...] = (0, 1, 2)  # perpendicular position: top/middle/bottom or left/middle/right
LANE_POS: tuple[float, ...] = (0.27, 0.5, 0.73)
LANE_WORDS: dict[str, tuple[str, ...]] = {
    "horizontal": ("along the top", "through the middle", "along the bottom"),
    "vertical": ("on the left", "through the middle", "on the right"),
}
PITCHES: dict[str, float] = {"low": 220.0, "mid": 440.0, "high": 880.0}  # Hz
RHYTHMS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # 0 = one steady tone, k = k beeps
LOUDNESS: dict[str, float] = {"quiet": 0.08, "loud": 0.6}  # peak amplitude
TIMBRES: tuple[str, ...] = ("pure", "buzzing")  # sine / square wave
SUBTITLE_TEMPLATES: tuple[str, ...] = (
    "{count}, and the {shape} goes {direction}",
    "can you hear {count}? the {colour} {shape} is going {direction}",
    "watch the {colour} {shape} move {direction} with {count}",
)
DEPTH_ORDERS: tuple[str, ...] = ("near", "far")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")

# (name, values) in mixed-radix order: an attribute tuple is an integer in [0, NUM_COMBINATIONS).
ATTRIBUTES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("size", SIZES),
    ("colour", tuple(COLOURS)),
    ("shape", SHAPES),
    ("direction", DIRECTIONS),
    ("lane", LANES),
    ("pitch", tuple(PITCHES)),
    ("rhythm", RHYTHMS),
    ("loudness", tuple(LOUDNESS)),
    ("timbre", TIMBRES),
    ("template", tuple(range(len(SUBTITLE_TEMPLATES)))),
    ("depth_order", DEPTH_ORDERS),
)
NUM_COMBINATIONS = math.prod(len(v) for _, v in ATTRIBUTES)

DEPTH_WALL_MM = (2500.0, 3500.0)  # wall distance range (millimetres)
DEPTH_FACTOR = {"near": 0.5, "far": 1.5}  # shape distance = factor * wall distance
DEPTH_VIEW_MM = 2000.0  # the image spans this width at the wall: converts mm to pixels for normals

CORPORA: dict[str, tuple[str, ...]] = {
    "omni": ("image", "video", "audio", "depth", "normal"),
    "image_text": ("image",),
    "audio_text": ("audio",),
    "video_text": ("video",),
}
# Caption fields each corpus stores (image_text stores its vision caption as the txt member).
CAPTION_FIELDS_OF: dict[str, tuple[str, ...]] = {
    "omni": schema.CAPTION_FIELDS,
    "image_text": ("vision",),
    "audio_text": ("audio",),
    "video_text": ("vision",),
}
_CORPUS_ID = {name: i for i, name in enumerate(CORPORA)}
_SPLIT_ID = {"train": 0, "val": 1}


def decode_attributes(code: int) -> dict[str, Any]:
    """Attribute dict of a mixed-radix attribute code in [0, NUM_COMBINATIONS)."""
    if not 0 <= code < NUM_COMBINATIONS:
        raise ValueError(f"attribute code {code} outside [0, {NUM_COMBINATIONS})")
    out: dict[str, Any] = {}
    for name, values in reversed(ATTRIBUTES):
        code, i = divmod(code, len(values))
        out[name] = values[i]
    return {name: out[name] for name, _ in ATTRIBUTES}


def _count_phrase(rhythm: int) -> str:
    if rhythm == 0:
        return "a steady tone"
    return f"{NUMBER_WORDS[rhythm]} beep{'s' if rhythm > 1 else ''}"


def captions_for(a: dict[str, Any]) -> dict[str, str]:
    """The four captions (schema.CAPTION_FIELDS) of an attribute dict; each word names an attribute."""
    axis = "horizontal" if a["direction"] in ("left", "right") else "vertical"
    vision = f"a {a['size']} {a['colour']} {a['shape']} moves {a['direction']} {LANE_WORDS[axis][a['lane']]}"
    sound = f"{a['loudness']} {a['pitch']} {a['timbre']}"
    if a["rhythm"] == 0:
        audio = f"a steady {sound} tone"
    else:
        audio = f"{NUMBER_WORDS[a['rhythm']]} {sound} beep{'s' if a['rhythm'] > 1 else ''}"
    subtitle = SUBTITLE_TEMPLATES[a["template"]].format(
        count=_count_phrase(a["rhythm"]), shape=a["shape"], colour=a["colour"], direction=a["direction"]
    )
    where = "close to" if a["depth_order"] == "near" else "far from"
    depth = f"the {a['shape']} is {where} the camera"
    return {"vision": vision, "audio": audio, "subtitle": subtitle, "depth": depth}


QA_TYPES: tuple[str, ...] = ("colour", "shape", "direction", "size", "count", "pitch", "loudness", "depth")


def qa_for(a: dict[str, Any]) -> list[dict[str, str]]:
    """Question/answer pairs about what a sample shows and sounds like, one per QA_TYPES entry that
    applies (no count question for a steady tone). A pure function of the attributes: generating QA
    draws nothing from the sample's random stream, so media and captions are those of format 1.
    Every answer is one caption word, so exact match is well defined."""
    shape, colour = a["shape"], a["colour"]
    qa = [
        ("colour", f"what colour is the {shape}?", colour),
        ("shape", f"which {colour} shape moves {a['direction']}?", shape),
        ("direction", f"which way does the {colour} {shape} move?", a["direction"]),
        ("size", f"is the {shape} small or large?", a["size"]),
    ]
    if a["rhythm"] > 0:
        qa.append(("count", "how many beeps can you hear?", NUMBER_WORDS[a["rhythm"]]))
    qa += [
        ("pitch", "is the sound low, mid or high?", a["pitch"]),
        ("loudness", "is the sound loud or quiet?", a["loudness"]),
        ("depth", f"is the {shape} close to or far from the camera?",
         "close" if a["depth_order"] == "near" else "far"),
    ]  # fmt: skip
    return [{"q": q, "a": ans, "type": t} for t, q, ans in qa]


def joined_caption(captions: dict[str, str]) -> str:
    """The concatenated caption (vision ; audio ; subtitle ; depth), as the text context sees it (Eq. 2)."""
    return schema.CAPTION_SEP.join(captions[f] for f in schema.CAPTION_FIELDS if f in captions)


# ----------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring_points(n: int, radii: Sequence[float], start_deg: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(n):
            ang = math.radians(start_deg + 360.0 * i / n)
            rad = radii[i % len(radii)]
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts

    if shape == "square":
        s = 0.82 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring_points(3, [r], -90.0)
    if shape == "star":
        return ring_points(10, [r, 0.42 * r], -90.0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "hexagon":
        return ring_points(6, [r], 0.0)
    if shape == "cross":
        w = 0.33 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    """Draw ``shape`` centred at (cx, cy) with radius r on a PIL ImageDraw."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.38 * r)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def motion_path(
    a: dict[str, Any], rng: np.random.Generator, size: int, num_frames: int
) -> tuple[np.ndarray, float]:
    """Shape centres (T, 2) as (x, y) pixels for the direction and lane, and the radius in pixels."""
    r = SIZE_RADIUS[a["size"]] * size
    margin = r + 1.0
    lane = LANE_POS[a["lane"]] * size + rng.uniform(-0.03, 0.03) * size
    start = margin + rng.uniform(0.0, 0.08) * size
    end = size - margin - rng.uniform(0.0, 0.08) * size
    travel = np.linspace(start, end, num_frames) if num_frames > 1 else np.array([start])
    if a["direction"] in ("left", "up"):
        travel = travel[::-1]  # image y grows downwards: "up" = decreasing y
    if a["direction"] in ("left", "right"):
        xy = np.stack([travel, np.full_like(travel, lane)], axis=1)
    else:
        xy = np.stack([np.full_like(travel, lane), travel], axis=1)
    return xy, r


def render_frames(a: dict[str, Any], xy: np.ndarray, r: float, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of the coloured shape at each centre on the grey background."""
    from PIL import Image, ImageDraw

    frames = np.empty((len(xy), size, size, 3), dtype=np.uint8)
    for t, (cx, cy) in enumerate(xy):
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw_shape(ImageDraw.Draw(img), a["shape"], cx, cy, r, COLOURS[a["colour"]])
        frames[t] = np.asarray(img)
    return frames


def render_depth(
    a: dict[str, Any], rng: np.random.Generator, cx: float, cy: float, r: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Depth (uint16 (H, W), millimetres) of a wall with the shape as a dome in front of / behind it,
    and the unit normals (H, W, 3) derived from that depth."""
    from PIL import Image, ImageDraw, ImageFilter

    mask = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(mask), a["shape"], cx, cy, r, 255)
    # A blurred mask gives the shape rounded, sloped sides, so its normals vary (not only at the rim).
    profile = np.asarray(mask.filter(ImageFilter.GaussianBlur(max(1.0, 0.25 * r))), dtype=np.float64) / 255.0
    wall = rng.uniform(*DEPTH_WALL_MM)
    depth_mm = wall + (DEPTH_FACTOR[a["depth_order"]] - 1.0) * wall * profile
    depth_u16 = np.clip(np.rint(depth_mm), 1, 65535).astype(np.uint16)
    normals = normals_from_depth(depth_u16.astype(np.float64), scale=size / DEPTH_VIEW_MM)
    return depth_u16, normals


def render_audio(a: dict[str, Any], rng: np.random.Generator, sample_rate: int, seconds: float) -> np.ndarray:
    """float32 (S,) mono: a steady tone or k evenly spaced beeps at the pitch, loudness and timbre."""
    n = max(1, round(sample_rate * seconds))
    t = np.arange(n) / sample_rate
    freq = PITCHES[a["pitch"]] * rng.uniform(0.98, 1.02)
    phase = 2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)
    # The square wave is scaled down so that "loud"/"quiet" mean the same RMS range for both timbres.
    carrier = np.sin(phase) if a["timbre"] == "pure" else 0.75 * np.sign(np.sin(phase))
    envelope = np.zeros(n)
    fade = max(1, round(0.005 * sample_rate))  # 5 ms ramps avoid clicks
    if a["rhythm"] == 0:
        spans = [(0, n)]
    else:
        slot = n / a["rhythm"]
        length = max(2 * fade + 1, round(min(0.2 * sample_rate, 0.5 * slot)))
        spans = [
            (round(i * slot + 0.25 * slot), round(i * slot + 0.25 * slot) + length)
            for i in range(a["rhythm"])
        ]
    for s, e in spans:
        e = min(e, n)
        env = np.ones(e - s)
        k = min(fade, (e - s) // 2)
        if k:
            ramp = np.linspace(0.0, 1.0, k, endpoint=False)
            env[:k], env[len(env) - k :] = ramp, ramp[::-1]
        envelope[s:e] = env
    return (LOUDNESS[a["loudness"]] * envelope * carrier).astype(np.float32)


@dataclass(frozen=True)
class DemoParams:
    """Generation parameters; demo.json stores them and ensure_demo_corpus compares them."""

    num_train: int = 2048
    num_val: int = 256
    seed: int = 0
    samples_per_shard: int = 256
    image_size: int = 64
    num_frames: int = 8
    audio_seconds: float = 2.0
    sample_rate: int = 16000
    with_frames: bool = True
    single_pair: bool = True
    num_single_pair: int | None = None
    vocab_size: int = 512

    def __post_init__(self) -> None:
        if self.num_single_pair is None:
            object.__setattr__(self, "num_single_pair", max(1, self.num_train // 2))
        object.__setattr__(self, "audio_seconds", float(self.audio_seconds))
        problems = []
        if self.num_train < 1:
            problems.append(f"num_train={self.num_train} (must be >= 1)")
        if not 0 <= self.num_val <= NUM_COMBINATIONS:
            problems.append(f"num_val={self.num_val} (must be in [0, {NUM_COMBINATIONS}])")
        if self.samples_per_shard < 1:
            problems.append(f"samples_per_shard={self.samples_per_shard} (must be >= 1)")
        if self.image_size < 16 or self.image_size % 2:
            problems.append(f"image_size={self.image_size} (must be even and >= 16: MP4 uses yuv420p)")
        if self.num_frames < 1:
            problems.append(f"num_frames={self.num_frames} (must be >= 1)")
        if not self.audio_seconds > 0:
            problems.append(f"audio_seconds={self.audio_seconds} (must be > 0)")
        if self.sample_rate < 4 * max(PITCHES.values()):
            problems.append(f"sample_rate={self.sample_rate} (must be >= {4 * max(PITCHES.values()):.0f} Hz)")
        if self.single_pair and self.num_single_pair is not None and self.num_single_pair < 1:
            problems.append(f"num_single_pair={self.num_single_pair} (must be >= 1)")
        if problems:
            raise ValueError("invalid demo corpus parameters: " + ", ".join(problems))

    @property
    def fps(self) -> float:
        """Video frame rate: the T frames span the audio duration."""
        return self.num_frames / self.audio_seconds


# ----------------------------------------------------------------------------- sample builders


def _rng(params: DemoParams, corpus: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([params.seed, _CORPUS_ID[corpus], _SPLIT_ID[split], index])


def sample_key(corpus: str, split: str, index: int) -> str:
    """Sample key, unique across the demo corpora: e.g. ``omni-train-000012``."""
    return f"{corpus.replace('_', '')}-{split}-{index:06d}"


def build_sample(params: DemoParams, corpus: str, split: str, index: int, code: int) -> dict[str, bytes]:
    """Tar members ``{ext: bytes}`` of one demo sample of ``corpus`` with attribute code ``code``."""
    a = decode_attributes(code)
    caps = captions_for(a)
    rng = _rng(params, corpus, split, index)
    members: dict[str, bytes] = {}
    s = params.image_size
    if corpus in ("omni", "image_text", "video_text"):
        xy, r = motion_path(a, rng, s, params.num_frames)
        frames = render_frames(a, xy, r, s)
        mid = len(frames) // 2
        if corpus in ("omni", "image_text"):
            members["jpg"] = encode_jpeg(frames[mid], quality=90)
        if corpus in ("omni", "video_text"):
            members["mp4"] = encode_mp4(frames, params.fps)
        if corpus == "omni" and params.with_frames:
            for i, frame in enumerate(frames):
                members[f"{schema.FRAME_PREFIX}{i}.jpg"] = encode_jpeg(frame, quality=90)
    if corpus in ("omni", "audio_text"):
        members["flac"] = encode_flac(
            render_audio(a, rng, params.sample_rate, params.audio_seconds), params.sample_rate
        )
    if corpus == "omni":
        depth, normals = render_depth(a, rng, float(xy[mid, 0]), float(xy[mid, 1]), r, s)
        members["depth.png"] = encode_png16(depth)
        members["normal.png"] = encode_normal_png(normals)
    if corpus == "image_text":
        members[schema.TXT_EXT] = caps["vision"].encode()
    else:
        meta = {
            "captions": {f: caps[f] for f in CAPTION_FIELDS_OF[corpus]},
            "category": a["pitch"] if corpus == "audio_text" else a["shape"],
            "source": f"demo-{corpus.replace('_', '-')}",
        }
        if corpus == "omni":
            meta["qa"] = qa_for(a)
        members[schema.JSON_EXT] = json.dumps(meta, sort_keys=True).encode()
    return members


def draw_codes(params: DemoParams) -> dict[tuple[str, str], np.ndarray]:
    """Attribute codes per (corpus, split): val distinct, train disjoint from val, single-pair free."""
    out: dict[tuple[str, str], np.ndarray] = {}
    rng = np.random.default_rng([params.seed, 1000])  # val first: train is drawn to avoid its tuples
    val = (
        rng.choice(NUM_COMBINATIONS, size=params.num_val, replace=False)
        if params.num_val
        else np.zeros(0, np.int64)
    )
    held_out = set(val.tolist())
    train = rng.integers(0, NUM_COMBINATIONS, size=params.num_train)
    for i in range(len(train)):
        while int(train[i]) in held_out:  # rare: num_val / 663,552 per draw
            train[i] = rng.integers(0, NUM_COMBINATIONS)
    out["omni", "train"] = train.astype(np.int64)
    if params.num_val:
        out["omni", "val"] = np.asarray(val, dtype=np.int64)
    if params.single_pair:
        for corpus in ("image_text", "audio_text", "video_text"):
            sp_rng = np.random.default_rng([params.seed, 1000 + _CORPUS_ID[corpus]])
            out[corpus, "train"] = sp_rng.integers(0, NUM_COMBINATIONS, size=params.num_single_pair).astype(
                np.int64
            )
    return out


def _write_shard(
    params: DemoParams, corpus: str, split: str, shard: int, start: int, codes: np.ndarray, path: str
) -> int:
    samples = (
        (sample_key(corpus, split, start + j), build_sample(params, corpus, split, start + j, int(c)))
        for j, c in enumerate(codes)
    )
    return write_tar(path, samples)


def _shard_tasks(
    params: DemoParams, codes: dict[tuple[str, str], np.ndarray], out: Path
) -> list[tuple[Any, ...]]:
    tasks = []
    for (corpus, split), cs in codes.items():
        for shard, start in enumerate(range(0, len(cs), params.samples_per_shard)):
            path = out / corpus / f"{split}-{shard:06d}.tar"
            tasks.append(
                (corpus, split, shard, start, cs[start : start + params.samples_per_shard], str(path))
            )
    return tasks


def _clean(out: Path) -> None:
    """Remove what an earlier generation may have left: only files this module writes."""
    (out / INDEX_FILE).unlink(missing_ok=True)
    for corpus in CORPORA:
        d = out / corpus
        if d.is_dir():
            for p in [
                *d.glob("train-*.tar"),
                *d.glob("val-*.tar"),
                *d.glob(".*.tmp*"),
                d / schema.SIZES_FILE,
            ]:
                p.unlink(missing_ok=True)


def make_demo_corpus(
    out_dir: str | Path,
    *,
    num_train: int = 2048,
    num_val: int = 256,
    seed: int = 0,
    samples_per_shard: int = 256,
    image_size: int = 64,
    num_frames: int = 8,
    audio_seconds: float = 2.0,
    sample_rate: int = 16000,
    with_frames: bool = True,
    single_pair: bool = True,
    num_single_pair: int | None = None,
    vocab_size: int = 512,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Generate the demo corpus under ``out_dir`` (see the module docstring); returns demo.json's content.

    Args:
        num_train / num_val: omni samples in the train / held-out split.
        seed: every random choice derives from it; same seed -> byte-identical shards.
        samples_per_shard: samples per tar shard.
        image_size: square frame side (even).
        num_frames: video frames T (spanning ``audio_seconds``).
        audio_seconds / sample_rate: audio clip length and rate.
        with_frames: also store the frames as ``frame{i}.jpg`` members in omni samples.
        single_pair: also write image_text, audio_text and video_text.
        num_single_pair: samples per single-pair corpus (default num_train // 2).
        vocab_size: requested SentencePiece vocabulary size.
        progress: show a tqdm progress bar.
        workers: processes rendering shards in parallel (default: the usable CPUs, at most 8, and
            no more than there are shards); the output is byte-identical for any value.
    """
    from tqdm import tqdm

    from mico_ds.data.tokenizer import train_sentencepiece

    params = DemoParams(
        num_train=num_train, num_val=num_val, seed=seed, samples_per_shard=samples_per_shard,
        image_size=image_size, num_frames=num_frames, audio_seconds=audio_seconds,
        sample_rate=sample_rate, with_frames=with_frames, single_pair=single_pair,
        num_single_pair=num_single_pair, vocab_size=vocab_size,
    )  # fmt: skip
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    codes = draw_codes(params)
    for corpus, _ in codes:
        (out / corpus).mkdir(exist_ok=True)
    tasks = _shard_tasks(params, codes, out)
    total = sum(len(c) for c in codes.values())
    # Starting worker processes costs some 0.1-1 s: not worth it for a tiny corpus unless asked for.
    workers = min(workers or (default_workers() if total >= 512 else 1), len(tasks))
    sizes: dict[str, dict[str, int]] = {}
    with tqdm(total=total, desc="demo corpus", unit="sample", disable=not progress) as bar:
        if workers == 1:
            results = (_write_shard(params, *t) for t in tasks)
            for task, n in zip(tasks, results):
                sizes.setdefault(task[0], {})[Path(task[5]).name] = n
                bar.update(n)
        else:
            # fork (as a DataLoader does): spawn would re-import the caller's __main__, which breaks for
            # stdin and unguarded scripts. The children only use numpy/Pillow/PyAV/soundfile, never the
            # parent's threads (torch, gloo), so copying a threaded parent is harmless here.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = [pool.submit(_write_shard, params, *t) for t in tasks]
                for task, fut in zip(tasks, futures):
                    n = fut.result()
                    sizes.setdefault(task[0], {})[Path(task[5]).name] = n
                    bar.update(n)
    for corpus, s in sizes.items():
        write_sizes(out / corpus, s)

    # Captions: val must be unique when concatenated (retrieval ground truth is one-to-one).
    val_caps = [
        joined_caption(captions_for(decode_attributes(int(c)))) for c in codes.get(("omni", "val"), [])
    ]
    if len(set(val_caps)) != len(val_caps):
        raise AssertionError("demo val captions are not unique")  # the attribute -> caption map is injective
    all_caps = [
        text
        for (corpus, _), cs in codes.items()
        for c in cs
        for f, text in captions_for(decode_attributes(int(c))).items()
        if f in CAPTION_FIELDS_OF[corpus]
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = train_sentencepiece(all_caps, out / "tokenizer", vocab_size=vocab_size, seed=seed)
    import sentencepiece as spm

    got_vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    corpora: dict[str, Any] = {}
    for (corpus, split), cs in codes.items():
        n_shards = sum(1 for name in sizes[corpus] if name.startswith(f"{split}-"))
        entry = corpora.setdefault(corpus, {"modalities": list(CORPORA[corpus]), "splits": {}})
        if len(cs):
            entry["splits"][split] = {
                "shards": f"{corpus}/{shard_pattern(split, n_shards)}",
                "num_samples": len(cs),
                "num_shards": n_shards,
            }
    index = {
        "format_version": FORMAT_VERSION,
        "generator": "mico_ds.data.demo",
        "params": asdict(params),
        "fps": params.fps,
        "corpora": corpora,
        "tokenizer": {"path": f"tokenizer/{model.name}", "vocab_size": got_vocab, "requested": vocab_size,
                      "note": [str(w.message) for w in caught]},
        "num_attribute_combinations": NUM_COMBINATIONS,
        "val_captions_unique": True,
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    write_json_atomic(out / INDEX_FILE, index)  # last: its presence means the corpus is complete
    return index


def _matching_index(out: Path, params: DemoParams) -> dict[str, Any] | None:
    try:
        index = json.loads((out / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if index.get("format_version") != FORMAT_VERSION or index.get("params") != asdict(params):
        return None
    sizes_ok = all((out / c / schema.SIZES_FILE).is_file() for c in index.get("corpora", {}))
    return index if sizes_ok and (out / index["tokenizer"]["path"]).is_file() else None


def ensure_demo_corpus(out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Return the demo corpus index of ``out_dir``, generating the corpus when missing or different.

    Takes the keyword arguments of ``make_demo_corpus``. Safe to call from several processes at once
    (e.g. every rank of a job sharing a file system): an exclusive ``fcntl.flock`` on
    ``out_dir/.demo.lock`` lets one process generate while the others wait, then find demo.json.
    Do not point two jobs with different parameters at one directory while either is training.
    """
    params = DemoParams(**{k: v for k, v in kwargs.items() if k not in ("progress", "workers")})
    out = Path(out_dir)
    index = _matching_index(out, params)
    if index is not None:
        return index
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # blocks until the generating process is done
        try:
            index = _matching_index(out, params)
            if index is not None:
                return index
            return make_demo_corpus(out, **kwargs)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def default_workers() -> int:
    """Worker processes for generation: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))
