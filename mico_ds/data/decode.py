"""Per-modality decoding of shard samples into model tensors (DESIGN.md §4).

A raw sample is a dict ``{"__key__": str, "__url__": str, <member ext>: bytes, ...}`` as read from a
WebDataset tar (member ``000123.depth.png`` -> ext ``"depth.png"``). :class:`SampleDecoder` turns it
into tensors for the modalities a corpus declares, driven by :class:`mico_ds.config.InputConfig`:

    image   (3, H, W)        Pillow; train: RandomResizedCrop(scale=train_crop_scale), no flip;
                             eval: shorter side to H + center crop (the CLIP/OpenCLIP eval transform)
    video   (T, 3, H, W)     pre-extracted ``frame{i}.jpg`` members when present (faster), else PyAV;
                             T frames, one per uniform segment (random in train, middle in eval);
                             one crop for all frames
    audio   (N, 1, F, Tm)    soundfile (flac/wav) or PyAV (mp3 & co), mono, resampled with PyAV's
                             AudioResampler (libswresample) to inputs.sample_rate, Kaldi log-mel
                             filterbank (kaldi-native-fbank, the torchaudio.compliance.kaldi.fbank
                             settings of MiCo/VAST/AST), normalized (fbank - mean) / (2 std), cut into
                             N clips of Tm frames
    depth   (1, H, W)        16-bit PNG or float .npy; same crop as the image; zero mean, unit std
    normal  (3, H, W)        PNG, n = rgb / 127.5 - 1; same crop as the image

Images, frames and normals are produced as ``uint8`` internally (cheap to stack and ship between
processes) and normalized per batch by :func:`normalize_image` / :func:`normals_to_float`; the public
``decode_*`` helpers return final float tensors unless ``as_uint8=True``.

Training randomness comes only from the ``numpy.random.Generator`` passed in, which the pipeline
derives from (seed, epoch, stream position) so that a resumed run reproduces every crop and frame.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mico_ds.config import InputConfig
from mico_ds.data import schema

# Kaldi frame geometry used by MiCo's audio processor (torchaudio.compliance.kaldi.fbank defaults).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
# One int16 LSB on a [-1, 1] waveform: Kaldi's default dither (1.0 on int16 samples), applied only in
# training, from the per-sample generator (kaldi-native-fbank's own dither RNG is not seedable).
TRAIN_DITHER = 1.0 / 32768.0


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is accounted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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


def frame_members(sample: Mapping[str, object]) -> list[str]:
    """Names of pre-extracted frame members (``frame{i}.jpg``), in frame order."""
    names = []
    for k in sample:
        if k.startswith(schema.FRAME_PREFIX) and "." in k:
            idx = k[len(schema.FRAME_PREFIX) : k.index(".")]
            if idx.isdigit():
                names.append((int(idx), k))
    return [k for _, k in sorted(names)]


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


# ----------------------------------------------------------------------------- audio


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 waveform at ``rate`` -> ``target`` Hz with PyAV's AudioResampler (libswresample)."""
    if rate == target:
        return wave
    import av

    arr = np.ascontiguousarray(wave, dtype=np.float32)[None]  # (channels=1, samples), packed
    frame = av.AudioFrame.from_ndarray(arr, format="flt", layout="mono")
    frame.sample_rate = rate
    rs = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = [f.to_ndarray()[0] for f in rs.resample(frame)]
    out += [f.to_ndarray()[0] for f in rs.resample(None)]  # flush the filter's delay line
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def load_waveform(data: bytes, ext: str, sample_rate: int) -> np.ndarray:
    """Encoded audio -> mono float32 in [-1, 1] at ``sample_rate`` (soundfile for flac/wav, else PyAV)."""
    if not data:
        raise SkipSample("bad_audio", "empty member")
    try:
        if ext in ("flac", "wav"):
            import soundfile as sf

            wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            return resample(wave.mean(axis=1), int(rate), sample_rate)
        import av

        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise SkipSample("bad_audio", "no audio stream")
            stream = container.streams.audio[0]
            rs = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(stream):
                chunks += [f.to_ndarray()[0] for f in rs.resample(frame)]
            chunks += [f.to_ndarray()[0] for f in rs.resample(None)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_audio", f"{type(e).__name__}: {e}") from None


_FBANK_OPTS: dict[tuple[int, int, bool], object] = {}


def kaldi_fbank(wave: np.ndarray, sample_rate: int, mel_bins: int, dither: float = 0.0) -> np.ndarray:
    """Kaldi log-mel filterbank (frames, mel_bins), the settings of MiCo's audio processor.

    Equivalent to ``torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=sr,
    use_energy=False, window_type='hanning', num_mel_bins=mel_bins, dither=dither, frame_shift=10)``
    (25 ms frames, pre-emphasis 0.97, DC removal, power spectrum, mel range 20 Hz - Nyquist, log
    floored at float32 eps, snip_edges). Returns (0, mel_bins) for input shorter than one frame.
    ``dither`` must be 0 here: callers add seeded dither themselves (reproducible on resume).
    """
    import kaldi_native_fbank as knf

    if dither != 0.0:
        raise ValueError("kaldi_fbank takes dither=0; add seeded noise to the waveform instead")
    key = (sample_rate, mel_bins, True)
    opts = _FBANK_OPTS.get(key)
    if opts is None:
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(sample_rate)
        opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
        opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
        opts.frame_opts.dither = 0.0
        opts.frame_opts.window_type = "hanning"
        opts.frame_opts.snip_edges = True
        opts.mel_opts.num_bins = mel_bins
        opts.use_energy = False
        opts.htk_compat = True
        _FBANK_OPTS[key] = opts
    fb = knf.OnlineFbank(opts)
    # A Python list crosses pybind11 faster than a numpy array for Sequence[float] arguments.
    fb.accept_waveform(float(sample_rate), np.asarray(wave, dtype=np.float32).tolist())
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, mel_bins), np.float32)
    return np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32, copy=False)


def audio_clips(
    wave: np.ndarray,
    inputs: InputConfig,
    train: bool,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Mono waveform at inputs.sample_rate -> (N, 1, F, Tm) normalized log-mel clips.

    As MiCo/VAST's audio processor: the filterbank is split into slices of Tm frames (at least N of
    them, zero-padded after normalization), the slices into N uniform segments, and one slice taken
    per segment -- random in training, the middle one in evaluation. Only the chosen slices'
    samples go through the filterbank; Kaldi frames are local, so this equals slicing the
    filterbank of the whole waveform.
    """
    sr, tm, n_clips, f = inputs.sample_rate, inputs.clip_frames, inputs.num_clips, inputs.mel_bins
    flen = int(sr * FRAME_LENGTH_MS / 1000)
    shift = int(sr * FRAME_SHIFT_MS / 1000)
    wave = np.asarray(wave, dtype=np.float32)
    wave = wave - wave.mean() if wave.size else wave  # AST/VAST remove the waveform's DC first
    if train:
        if rng is None:
            raise ValueError("training-mode decoding needs a per-sample generator (rng)")
        wave = wave + (TRAIN_DITHER * rng.standard_normal(wave.shape)).astype(np.float32)
    total = 1 + (len(wave) - flen) // shift if len(wave) >= flen else 0
    n_slices = max(n_clips, math.ceil(total / tm))
    groups = np.array_split(np.arange(n_slices), n_clips)
    if train:
        picks = [int(g[rng.integers(len(g))]) for g in groups]
    else:
        picks = [int(g[(len(g) + 1) // 2 - 1]) for g in groups]
    out = np.zeros((n_clips, 1, f, tm), np.float32)
    scale = 1.0 / (2.0 * inputs.audio_std)
    for c, s in enumerate(picks):
        a, b = s * tm, min((s + 1) * tm, total)
        if b <= a:
            continue  # a padding slice: stays 0 (the normalized padding value, as VAST)
        fb = kaldi_fbank(wave[a * shift : (b - 1) * shift + flen], sr, f)
        out[c, 0, :, : fb.shape[0]] = ((fb - inputs.audio_mean) * scale).T
    return torch.from_numpy(out)


def decode_audio(
    data: bytes, ext: str, inputs: InputConfig, train: bool, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """Encoded audio -> (N, 1, F, Tm) clips (see :func:`audio_clips`)."""
    wave = load_waveform(data, ext, inputs.sample_rate)
    if wave.size == 0:
        raise SkipSample("bad_audio", "no samples")
    return audio_clips(wave, inputs, train, rng)


# ----------------------------------------------------------------------------- text


def caption_fields(sample: Mapping[str, object], rng: np.random.Generator | None = None) -> dict[str, str]:
    """Captions by field (schema.CAPTION_FIELDS) from the ``json`` member, plus ``txt`` as the vision
    caption (img2dataset / OpenCLIP shards). A field holding a list of captions yields one of them:
    random in training (``rng`` given), the first otherwise."""
    out: dict[str, str] = {}
    raw = sample.get(schema.JSON_EXT)
    if raw is not None:
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError(f"top level is {type(meta).__name__}, not an object")
        except Exception as e:
            raise SkipSample("bad_json", f"{type(e).__name__}: {e}") from None
        caps = meta.get("captions") or {}
        if not isinstance(caps, dict):
            raise SkipSample("bad_json", f"captions is {type(caps).__name__}, not an object")
        for field in schema.CAPTION_FIELDS:
            v = caps.get(field)
            if isinstance(v, list):
                v = [x for x in v if isinstance(x, str) and x.strip()]
                v = (v[int(rng.integers(len(v)))] if rng is not None else v[0]) if v else None
            if isinstance(v, str) and v.strip():
                out[field] = v.strip()
    txt = sample.get(schema.TXT_EXT)
    if txt is not None and "vision" not in out:
        try:
            t = txt.decode("utf-8").strip() if isinstance(txt, bytes) else str(txt).strip()
        except UnicodeDecodeError as e:
            raise SkipSample("bad_text", str(e)) from None
        if t:
            out["vision"] = t
    return out


def join_captions(fields: Mapping[str, str]) -> str:
    """Captions of a sample concatenated in schema order with the separator (MiCo Eq. 2)."""
    return schema.CAPTION_SEP.join(fields[f] for f in schema.CAPTION_FIELDS if fields.get(f))


# ----------------------------------------------------------------------------- whole samples


def find_member(sample: Mapping[str, object], modality: str) -> str | None:
    """Name of the member carrying ``modality`` (``"frames"`` for pre-extracted video frames)."""
    if modality == "video" and frame_members(sample):
        return "frames"
    exts = {
        "image": schema.IMAGE_EXTS,
        "video": schema.VIDEO_EXTS,
        "audio": schema.AUDIO_EXTS,
        "depth": schema.DEPTH_EXTS,
        "normal": schema.NORMAL_EXTS,
    }[modality]
    for e in exts:
        if e in sample:
            return e
    return None


class SampleDecoder:
    """Decode one raw sample into the tensors of ``modalities`` (see module docstring).

    Raises :class:`SkipSample` with a reason (``missing_modality``, ``bad_<modality>``, ``bad_json``,
    ``missing_caption``) for samples that cannot be used. Extra members are ignored.
    Spatial modalities share one crop, chosen on the image (else video, depth, normal) geometry.
    """

    def __init__(
        self, modalities: Sequence[str], inputs: InputConfig, train: bool, require_caption: bool = True
    ) -> None:
        bad = [m for m in modalities if m not in schema.MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}; known: {schema.MODALITIES}")
        # Canonical order: the crop is chosen by the first spatial modality (image before video ...).
        self.modalities = [m for m in schema.MODALITIES if m in modalities]
        self.inputs = inputs
        self.train = train
        self.require_caption = require_caption

    def __call__(self, sample: Mapping[str, object], rng: np.random.Generator | None = None) -> dict:
        """Raw sample -> {"key", <modality>: tensor (uint8 for image/video/normal), "fields": {...}}."""
        members = {}
        for m in self.modalities:
            name = find_member(sample, m)
            if name is None:
                raise SkipSample("missing_modality", m)
            members[m] = name
        fields = caption_fields(sample, rng if self.train else None)
        if self.require_caption and not fields:
            raise SkipSample("missing_caption", "no json captions and no txt")
        inp, train = self.inputs, self.train
        out: dict = {"key": str(sample.get("__key__", "")), "fields": fields}
        crop: Crop | None = None
        for m in self.modalities:
            name = members[m]
            if m == "image":
                out[m], crop = decode_image(sample[name], inp, train, rng, crop, as_uint8=True)
            elif m == "video":
                if name == "frames":
                    frames = [sample[k] for k in frame_members(sample)]
                    out[m], crop = decode_frames(frames, inp, train, rng, crop, as_uint8=True)
                else:
                    out[m], crop = decode_video(sample[name], inp, train, rng, crop, as_uint8=True)
            elif m == "audio":
                out[m] = decode_audio(sample[name], name, inp, train, rng)
            elif m == "depth":
                out[m], crop = decode_depth(sample[name], name, inp, train, rng, crop)
            elif m == "normal":
                out[m], crop = decode_normal(sample[name], inp, train, rng, crop, as_uint8=True)
        return out


def finalize(name: str, x: torch.Tensor, inputs: InputConfig) -> torch.Tensor:
    """Turn a stacked internal tensor of modality ``name`` into the model's float input."""
    if name in ("image", "video"):
        return normalize_image(x, inputs)
    if name == "normal":
        return normals_to_float(x)
    return x
