"""Decoding of the spatial modalities: images, video (frames or PyAV), depth maps, normal maps.

    image   (3, H, W)        Pillow; train: RandomResizedCrop(scale=train_crop_scale), no flip;
                             eval: shorter side to H + center crop (the CLIP/OpenCLIP eval transform)
    video   (T, 3, H, W)     pre-extracted ``frame{i}.jpg`` members when present (faster), else PyAV;
                             T frames, one per uniform segment (random in train, middle in eval);
                             one crop for all frames
    depth   (1, H, W)        16-bit PNG or float .npy; same crop as the image; zero mean, unit std
    normal  (3, H, W)        PNG, n = rgb / 127.5 - 1; same crop as the image

Images, frames and normals are produced as ``uint8`` internally (cheap to stack and ship between
processes) and normalized per batch by :func:`normalize_image` / :func:`normals_to_float`; the public
``decode_*`` helpers return final float tensors unless ``as_uint8=True``. Training randomness comes
only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mico_ds.config import InputConfig
from mico_ds.data.read.skips import SkipSample

# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Crop:
    """A crop box in relative coordinates (fractions of width/height), so one crop applies to maps
    of different resolutions (an image and its depth map) and to every frame of a video."""

    x0: float
    y0: float
    x1: float
    y1: float

    def box(self, w: int, h: int) -> tuple[float, float, float, float]:
        return (self.x0 * w, self.y0 * h, self.x1 * w, self.y1 * h)


def center_crop(w: int, h: int) -> Crop:
    """The eval crop: the central square (= resize shorter side to S, then center-crop S)."""
    s = min(w, h)
    x0, y0 = (w - s) / 2, (h - s) / 2
    return Crop(x0 / w, y0 / h, (x0 + s) / w, (y0 + s) / h)


def random_resized_crop(
    w: int,
    h: int,
    scale: Sequence[float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Crop:
    """torchvision's RandomResizedCrop.get_params, driven by ``rng`` (integer pixel box)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(rng.integers(0, h - ch + 1))
            j = int(rng.integers(0, w - cw + 1))
            return Crop(j / w, i / h, (j + cw) / w, (i + ch) / h)
    # Fallback (as torchvision): central crop with the aspect ratio clamped to `ratio`.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    i, j = (h - ch) // 2, (w - cw) // 2
    return Crop(j / w, i / h, (j + cw) / w, (i + ch) / h)


def choose_crop(w: int, h: int, inputs: InputConfig, train: bool, rng: np.random.Generator | None) -> Crop:
    if train:
        if rng is None:
            raise ValueError("training-mode decoding needs a per-sample generator (rng)")
        return random_resized_crop(w, h, inputs.train_crop_scale, rng)
    return center_crop(w, h)


# ----------------------------------------------------------------------------- images


def _open_image(data: bytes, what: str) -> Image.Image:
    if not data:
        raise SkipSample(f"bad_{what}", "empty member")
    try:
        img = Image.open(io.BytesIO(data))
        img.size  # noqa: B018 - header parsed; errors surface here
        return img
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise SkipSample(f"bad_{what}", f"{type(e).__name__}: {e}") from None


def _resize_rgb(img: Image.Image, crop: Crop, size: int, what: str) -> np.ndarray:
    """Crop + resize to (size, size) RGB uint8 in one Pillow call.

    JPEGs are first decoded at a reduced DCT scale (``draft``) chosen so that the crop still has at
    least ``size`` pixels per side: a 512 px JPEG for a 224 px input decodes at 256 px, ~3x faster.
    """
    try:
        w, h = img.size
        if img.format == "JPEG":
            bw = max((crop.x1 - crop.x0) * w, 1.0)
            bh = max((crop.y1 - crop.y0) * h, 1.0)
            req = (math.ceil(w * size / bw), math.ceil(h * size / bh))
            if req[0] < w and req[1] < h:
                img.draft("RGB", req)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")  # palette/RGBA/CMYK/16-bit: resampling needs a plain mode
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=crop.box(*img.size))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample(f"bad_{what}", f"{type(e).__name__}: {e}") from None


def _hwc_to_chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array -> contiguous (C, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def normalize_image(x: torch.Tensor, inputs: InputConfig) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 ((x / 255) - mean) / std, as one fused multiply-subtract."""
    mean = torch.tensor(inputs.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(inputs.image_std, dtype=torch.float32).view(3, 1, 1)
    return x.to(torch.float32).mul_(1.0 / (255.0 * std)).sub_(mean / std)


def normals_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 normal map (..., 3, H, W) -> n = rgb / 127.5 - 1 in [-1, 1]."""
    return x.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)


def image_size_of(data: bytes, what: str = "image") -> tuple[int, int]:
    return _open_image(data, what).size


def decode_image(
    data: bytes,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    as_uint8: bool = False,
) -> tuple[torch.Tensor, Crop]:
    """Encoded image -> ((3, S, S) tensor, the crop used). ``crop`` overrides the random choice."""
    img = _open_image(data, "image")
    if crop is None:
        crop = choose_crop(*img.size, inputs, train, rng)
    x = _hwc_to_chw(_resize_rgb(img, crop, inputs.image_size, "image"))
    return (x if as_uint8 else normalize_image(x, inputs)), crop


# ----------------------------------------------------------------------------- video


def frame_indices(n: int, k: int, train: bool, rng: np.random.Generator | None) -> list[int]:
    """``k`` indices into ``n`` frames: one per uniform segment, random inside it (train) or its
    middle (eval). Segments shorter than a frame repeat frames, so short videos still give ``k``."""
    if n <= 0:
        raise ValueError(f"cannot sample {k} frames from a video with {n} frames")
    edges = np.linspace(0, n, k + 1)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo, hi = int(a), max(int(a) + 1, int(math.ceil(b)))
        hi = min(hi, n)
        if train:
            if rng is None:
                raise ValueError("training-mode decoding needs a per-sample generator (rng)")
            out.append(int(rng.integers(lo, hi)))
        else:
            out.append(min((lo + hi - 1) // 2, n - 1))
    return out


def decode_frames(
    frames: Sequence[bytes],
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    num_frames: int | None = None,
    as_uint8: bool = False,
) -> tuple[torch.Tensor, Crop]:
    """Pre-extracted encoded frames -> ((T, 3, S, S), crop): T sampled uniformly, one crop for all."""
    k = num_frames or _num_frames(inputs, train)
    idx = frame_indices(len(frames), k, train, rng)
    imgs = {i: _open_image(frames[i], "video") for i in sorted(set(idx))}
    if crop is None:
        crop = choose_crop(*imgs[idx[0]].size, inputs, train, rng)
    arrs = {i: _resize_rgb(im, crop, inputs.image_size, "video") for i, im in imgs.items()}
    x = torch.from_numpy(np.ascontiguousarray(np.stack([arrs[i] for i in idx]).transpose(0, 3, 1, 2)))
    return (x if as_uint8 else normalize_image(x, inputs)), crop


def _num_frames(inputs: InputConfig, train: bool) -> int:
    return inputs.num_frames if train or inputs.eval_num_frames is None else inputs.eval_num_frames


def decode_video(
    data: bytes,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    num_frames: int | None = None,
    as_uint8: bool = False,
) -> tuple[torch.Tensor, Crop]:
    """Encoded video (mp4/webm/gif) -> ((T, 3, S, S), crop) via PyAV.

    When the container states its frame count, frames are decoded in order up to the last sampled
    one and only the sampled ones are converted to RGB; otherwise (some webm/gif) every frame is
    decoded first to count them.
    """
    import av  # local: PyAV's import is slow and audio-only / image-only workers never need it

    if not data:
        raise SkipSample("bad_video", "empty member")
    k = num_frames or _num_frames(inputs, train)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SkipSample("bad_video", "no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1  # parallelism comes from data-loader workers, not codec threads
            n = stream.frames or 0
            picked: dict[int, np.ndarray] = {}
            idx: list[int] = []
            if n > 0:
                idx = frame_indices(n, k, train, rng)
                wanted, last = set(idx), max(idx)
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        picked[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        if n <= 0 or len(picked) < len(set(idx)):
            # Unknown (webm/gif) or over-stated frame count: decode everything, then sample.
            with av.open(io.BytesIO(data), mode="r") as container:
                stream = container.streams.video[0]
                stream.thread_count = 1
                frames_all = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if not frames_all:
                raise SkipSample("bad_video", "no decodable frames")
            idx = frame_indices(len(frames_all), k, train, rng)
            picked = {i: frames_all[i] for i in set(idx)}
    except SkipSample:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), ValueError on odd streams
        raise SkipSample("bad_video", f"{type(e).__name__}: {e}") from None
    first = picked[idx[0]]
    h, w = first.shape[:2]
    if crop is None:
        crop = choose_crop(w, h, inputs, train, rng)
    out = {i: _resize_rgb(Image.fromarray(a), crop, inputs.image_size, "video") for i, a in picked.items()}
    x = torch.from_numpy(np.ascontiguousarray(np.stack([out[i] for i in idx]).transpose(0, 3, 1, 2)))
    return (x if as_uint8 else normalize_image(x, inputs)), crop


# ----------------------------------------------------------------------------- depth / normals


def decode_depth(
    data: bytes,
    ext: str,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
) -> tuple[torch.Tensor, Crop]:
    """16-bit PNG or float ``.npy`` depth -> ((1, S, S) float32, crop), zero mean / unit std.

    The normalization is applied after crop + resize so the tensor the model sees has exactly
    zero mean and unit std (a constant map becomes zeros).
    """
    if not data:
        raise SkipSample("bad_depth", "empty member")
    try:
        if ext.endswith("npy"):
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            arr = np.squeeze(np.asarray(arr, dtype=np.float32))
            if arr.ndim != 2:
                raise ValueError(f"depth.npy must be (H, W), got shape {arr.shape}")
        else:
            img = Image.open(io.BytesIO(data))
            arr = np.asarray(img, dtype=np.float32)
            if arr.ndim == 3:  # an 8-bit RGB "depth" encoded as colour: use the first channel
                arr = np.ascontiguousarray(arr[..., 0])
        if not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        h, w = arr.shape
        if crop is None:
            crop = choose_crop(w, h, inputs, train, rng)
        s = inputs.image_size
        d = np.asarray(Image.fromarray(arr).resize((s, s), Image.Resampling.BILINEAR, box=crop.box(w, h)))
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_depth", f"{type(e).__name__}: {e}") from None
    d = d - d.mean()
    std = d.std()
    if std > 1e-6:
        d = d / std
    return torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32))[None], crop


def decode_normal(
    data: bytes,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    as_uint8: bool = False,
) -> tuple[torch.Tensor, Crop]:
    """Normal-map PNG (RGB = (n + 1) * 127.5) -> ((3, S, S) n in [-1, 1], crop)."""
    img = _open_image(data, "normal")
    if crop is None:
        crop = choose_crop(*img.size, inputs, train, rng)
    try:
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = (inputs.image_size, inputs.image_size)
        a = np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=crop.box(*img.size)))
    except Exception as e:
        raise SkipSample("bad_normal", f"{type(e).__name__}: {e}") from None
    x = _hwc_to_chw(a)
    return (x if as_uint8 else normals_to_float(x)), crop
