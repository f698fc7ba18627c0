"""The demo world: seeded synthetic omni-modal samples whose captions describe what they show.

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
concatenated captions. This module holds the attribute space, the captions and the renderers; the
corpus written from them (splits, single-pair corpora, shards, tokenizer) is ``mico_ds.demo.corpus``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mico_ds.data import schema
from mico_ds.data.write.media import normals_from_depth

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
CORPUS_ID = {name: i for i, name in enumerate(CORPORA)}
SPLIT_ID = {"train": 0, "val": 1, "tune": 2, "test": 3}


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
    num_tune: int = 128
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
    num_pair_heldout: int = 0  # image_text val and test items each (a downstream dataset's splits)

    def __post_init__(self) -> None:
        if self.num_single_pair is None:
            object.__setattr__(self, "num_single_pair", max(1, self.num_train // 2))
        object.__setattr__(self, "audio_seconds", float(self.audio_seconds))
        problems = []
        if self.num_train < 1:
            problems.append(f"num_train={self.num_train} (must be >= 1)")
        if not 0 <= self.num_val <= NUM_COMBINATIONS:
            problems.append(f"num_val={self.num_val} (must be in [0, {NUM_COMBINATIONS}])")
        if not 0 <= self.num_tune <= NUM_COMBINATIONS - self.num_val:
            problems.append(f"num_tune={self.num_tune} (must be in [0, {NUM_COMBINATIONS} - num_val])")
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
        if self.num_pair_heldout < 0 or (self.num_pair_heldout and not self.single_pair):
            problems.append(f"num_pair_heldout={self.num_pair_heldout} (must be >= 0; needs single_pair)")
        if problems:
            raise ValueError("invalid demo corpus parameters: " + ", ".join(problems))

    @property
    def fps(self) -> float:
        """Video frame rate: the T frames span the audio duration."""
        return self.num_frames / self.audio_seconds
