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
only from the ``numpy.random.Generator`` passed in. ``limits`` (``data.limits``, default its defaults)
are checked on headers before decoding (``mico_ds.data.read.limits``).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mico_ds.config import DecodeLimits, InputConfig
from mico_ds.data.read import limits as L
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


def _pil_skip(e: Exception, what: str) -> SkipSample:
    """The skip of a Pillow error: its own decompression-bomb refusal is a pixel cap."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return SkipSample(L.TOO_MANY_PIXELS, f"{what}: {e}")
    return SkipSample(f"bad_{what}", f"{type(e).__name__}: {e}")


def _open_image(data: bytes, what: str, limits: DecodeLimits | None = None) -> Image.Image:
    """Pillow's lazy open (header only) with the pixel cap applied before anything is decoded."""
    if not data:
        raise SkipSample(f"bad_{what}", "empty member")
    try:
        with warnings.catch_warnings():
            # data.limits.image_pixels decides (below); Pillow's warning above its own threshold would
            # be noise, and an exception where warnings are errors.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size  # header parsed; errors surface here
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise _pil_skip(e, what) from None
    if w < 1 or h < 1:
        raise SkipSample(f"bad_{what}", f"size {w}x{h}")
    L.check("image_pixels", w * h, L.resolve(limits), f"{what} {w}x{h}")
    return img


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
        raise _pil_skip(e, what) from None


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


def image_size_of(data: bytes, what: str = "image", limits: DecodeLimits | None = None) -> tuple[int, int]:
    return _open_image(data, what, limits).size


def decode_image(
    data: bytes,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    as_uint8: bool = False,
    limits: DecodeLimits | None = None,
) -> tuple[torch.Tensor, Crop]:
    """Encoded image -> ((3, S, S) tensor, the crop used). ``crop`` overrides the random choice."""
    img = _open_image(data, "image", limits)
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
    limits: DecodeLimits | None = None,
) -> tuple[torch.Tensor, Crop]:
    """Pre-extracted encoded frames -> ((T, 3, S, S), crop): T sampled uniformly, one crop for all."""
    lim = L.resolve(limits)
    L.check("video_frames", len(frames), lim, "frame members")
    k = num_frames or _num_frames(inputs, train)
    idx = frame_indices(len(frames), k, train, rng)
    imgs = {i: _open_image(frames[i], "video", lim) for i in sorted(set(idx))}
    for i, im in imgs.items():
        L.check("video_pixels", im.size[0] * im.size[1], lim, f"frame{i} {im.size[0]}x{im.size[1]}")
    if crop is None:
        crop = choose_crop(*imgs[idx[0]].size, inputs, train, rng)
    arrs = {i: _resize_rgb(im, crop, inputs.image_size, "video") for i, im in imgs.items()}
    x = torch.from_numpy(np.ascontiguousarray(np.stack([arrs[i] for i in idx]).transpose(0, 3, 1, 2)))
    return (x if as_uint8 else normalize_image(x, inputs)), crop


def _num_frames(inputs: InputConfig, train: bool) -> int:
    return inputs.num_frames if train or inputs.eval_num_frames is None else inputs.eval_num_frames


def _video_stream(container, lim: DecodeLimits):  # noqa: ANN001, ANN202 - av types, imported lazily
    """The first video stream, single-threaded, with the resolution cap applied to its header."""
    if not container.streams.video:
        raise SkipSample("bad_video", "no video stream")
    stream = container.streams.video[0]
    stream.thread_count = 1  # parallelism comes from data-loader workers, not codec threads
    w, h = stream.codec_context.width, stream.codec_context.height
    L.check("video_pixels", w * h, lim, f"video stream {w}x{h}")
    return stream


def _stated_frames(container, stream) -> tuple[int, int]:  # noqa: ANN001 - av types
    """(the frame count the container states or 0, that or an estimate from duration x frame rate)."""
    n = stream.frames or 0
    if n > 0:
        return n, n
    rate = stream.average_rate
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1e6  # AV_TIME_BASE
    else:
        return 0, 0
    return 0, (int(math.ceil(seconds * float(rate))) if rate else 0)


def _decode_pass(
    container,
    stream,
    lim: DecodeLimits,
    wanted: set[int],  # noqa: ANN001 - av types
) -> tuple[int, dict[int, np.ndarray]]:
    """One pass over the frames: (frames decoded, the ``wanted`` ones as RGB arrays). Stops after the
    last wanted one (all frames when ``wanted`` is empty, which counts them); only wanted frames are
    converted and kept, so memory stays at len(wanted) frames whatever the length of the video."""
    last = max(wanted) if wanted else None
    count, picked = 0, {}
    for frame in container.decode(stream):
        # Header or not, what the decoder produces is held to the caps (a stream may change size).
        L.check("video_pixels", frame.width * frame.height, lim, f"frame {frame.width}x{frame.height}")
        if count in wanted:
            picked[count] = frame.to_ndarray(format="rgb24")
        count += 1
        L.check("video_frames", count, lim, "frames decoded")
        if last is not None and count > last:
            break
    return count, picked


def _packet_count(data: bytes, lim: DecodeLimits) -> int:
    """Frames of a stream that states none (webm, gif), by demuxing: one packet per frame for these
    codecs, and no decoding (~100x faster than counting decoded frames)."""
    import av

    n = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        for packet in container.demux(_video_stream(container, lim)):
            n += packet.size > 0  # the demuxer's final flush packet is empty
            L.check("video_frames", n, lim, "frames demuxed")
    return n


def _reopened_pass(data: bytes, lim: DecodeLimits, wanted: set[int]) -> tuple[int, dict[int, np.ndarray]]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        return _decode_pass(container, _video_stream(container, lim), lim, wanted)


def decode_video(
    data: bytes,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    num_frames: int | None = None,
    as_uint8: bool = False,
    limits: DecodeLimits | None = None,
) -> tuple[torch.Tensor, Crop]:
    """Encoded video (mp4/webm/gif) -> ((T, 3, S, S), crop) via PyAV.

    Frames are decoded in order up to the last sampled one and only the sampled ones are converted to
    RGB and kept (memory: T frames, whatever the video's length). The frame count is the container's,
    else (webm, gif) the packets'; when it proves too high, a first pass counts decoded frames.
    """
    import av  # local: PyAV's import is slow and audio-only / image-only workers never need it

    if not data:
        raise SkipSample("bad_video", "empty member")
    lim = L.resolve(limits)
    k = num_frames or _num_frames(inputs, train)
    try:
        picked: dict[int, np.ndarray] = {}
        idx: list[int] = []
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = _video_stream(container, lim)
            n, estimate = _stated_frames(container, stream)
            L.check("video_frames", estimate, lim, "frames stated by the container")
            if n > 0:
                idx = frame_indices(n, k, train, rng)
                _, picked = _decode_pass(container, stream, lim, set(idx))
        if n <= 0:
            n = _packet_count(data, lim)
            if n > 0:
                idx = frame_indices(n, k, train, rng)
                _, picked = _reopened_pass(data, lim, set(idx))
        if n <= 0 or len(picked) < len(set(idx)):
            # No frames in the packets, or fewer decode than stated: count decoded frames, then sample.
            total, _ = _reopened_pass(data, lim, set())
            if total == 0:
                raise SkipSample("bad_video", "no decodable frames")
            idx = frame_indices(total, k, train, rng)
            _, picked = _reopened_pass(data, lim, set(idx))
            if len(picked) < len(set(idx)):
                raise SkipSample("bad_video", f"{total} frames counted, fewer on a second decode")
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


def _load_npy(data: bytes, lim: DecodeLimits) -> np.ndarray:
    """A ``.npy`` depth map, its header (shape, dtype) checked against the caps before the array is
    allocated: numpy would allocate whatever shape the header claims."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    fmt = np.lib.format
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.kind not in "biuf":
        raise SkipSample("bad_depth", f"depth.npy of dtype {dtype} (not a real number)")
    pixels = math.prod(shape)
    L.check("image_pixels", pixels, lim, f"depth.npy of shape {shape}")
    if pixels * dtype.itemsize > len(data) - f.tell():
        raise SkipSample("bad_depth", f"depth.npy truncated: {len(data)} bytes for shape {shape} {dtype}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_depth(
    data: bytes,
    ext: str,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[torch.Tensor, Crop]:
    """16-bit PNG or float ``.npy`` depth -> ((1, S, S) float32, crop), zero mean / unit std.

    The normalization is applied after crop + resize so the tensor the model sees has exactly
    zero mean and unit std (a constant map becomes zeros).
    """
    if not data:
        raise SkipSample("bad_depth", "empty member")
    lim = L.resolve(limits)
    try:
        if ext.endswith("npy"):
            with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, zeroed below
                arr = np.asarray(_load_npy(data, lim), dtype=np.float32)
            while arr.ndim > 2 and 1 in (arr.shape[0], arr.shape[-1]):  # (1, H, W), (H, W, 1): (H, W)
                arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
            if arr.ndim != 2 or min(arr.shape) < 1:
                raise ValueError(f"depth.npy must be (H, W), got shape {arr.shape}")
        else:
            img = _open_image(data, "depth", lim)
            arr = np.asarray(img, dtype=np.float32)
            if arr.ndim == 3:  # an 8-bit RGB "depth" encoded as colour: use the first channel
                arr = np.ascontiguousarray(arr[..., 0])
            if arr.ndim != 2:  # a mode numpy does not see as a plain array
                raise ValueError(f"depth image of mode {img.mode} gives shape {arr.shape}")
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
    with np.errstate(over="ignore", invalid="ignore"):
        c = d - d.mean()
        std = c.std()
    if not (np.isfinite(std) and np.isfinite(c).all()):
        # Depths near float32's range overflow float32 statistics: redo them in float64.
        d64 = np.nan_to_num(d.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        c = d64 - d64.mean()
        std = c.std()
    if std > 1e-6:
        c = c / std
    return torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))[None], crop


def decode_normal(
    data: bytes,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
    crop: Crop | None = None,
    as_uint8: bool = False,
    limits: DecodeLimits | None = None,
) -> tuple[torch.Tensor, Crop]:
    """Normal-map PNG (RGB = (n + 1) * 127.5) -> ((3, S, S) n in [-1, 1], crop)."""
    img = _open_image(data, "normal", limits)
    if crop is None:
        crop = choose_crop(*img.size, inputs, train, rng)
    try:
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = (inputs.image_size, inputs.image_size)
        a = np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=crop.box(*img.size)))
    except Exception as e:
        raise _pil_skip(e, "normal") from None
    x = _hwc_to_chw(a)
    return (x if as_uint8 else normals_to_float(x)), crop
