"""Whole samples: a raw sample (``mico_ds.data.io``) -> the tensors of the modalities a corpus
declares, and its captions (docs/architecture.md, "Data contract").

:class:`SampleDecoder` drives the per-modality decoders (``visual``, ``audio``) with
:class:`mico_ds.config.InputConfig`. Training randomness comes only from the
``numpy.random.Generator`` passed in, which the stream derives from (seed, epoch, stream position)
so that a resumed run reproduces every crop, frame and caption choice.

Bad data never stops a run (docs/architecture.md, "Data contract"): members past ``data.limits`` are
refused before decoding (``mico_ds.data.read.limits``), and whatever else a decoder raises for one
sample becomes the skip ``decode_error`` naming the member and the exception.

``audio`` comes from the sample's audio member, else from the audio stream of its mp4/webm video
member (``find_member(..., audio_track=True)``): the same bytes object the frames are decoded from,
opened a second time (no copy; the member-size cap applies to it once), and the same window, since
frames and audio clips are both spread over the whole member. A video without an audio stream is the
skip ``no_audio_stream``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mico_ds.config import DecodeLimits, InputConfig
from mico_ds.data import schema
from mico_ds.data.io import FRAMES, OVERSIZED, find_member, frame_members
from mico_ds.data.read import limits as L
from mico_ds.data.read.audio import decode_audio
from mico_ds.data.read.skips import DECODE_ERROR, SkipSample
from mico_ds.data.read.visual import (
    Crop,
    decode_depth,
    decode_frames,
    decode_image,
    decode_normal,
    decode_video,
    normalize_image,
    normals_to_float,
)

# ----------------------------------------------------------------------------- text


def is_text(v: object) -> bool:
    """A string a tokenizer can take: UTF-8 encodable (JSON may hold lone surrogates such as
    ``"\\ud800"``, which tokenizers refuse, for a whole batch)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_caption(v: object) -> bool:
    """A usable caption: non-blank text (:func:`is_text`)."""
    return is_text(v) and bool(v.strip())  # type: ignore[union-attr]


def source_key(sample: Mapping[str, object], key: str) -> str:
    """The recording a sample comes from: its json ``video_id`` (clips cut from one video share it),
    else the sample key. Read after :func:`caption_fields` has checked the json member."""
    raw = sample.get(schema.JSON_EXT)
    if raw is not None:
        with contextlib.suppress(ValueError, TypeError):
            v = json.loads(raw).get(schema.SOURCE_KEY_FIELD)
            if isinstance(v, (str, int)) and str(v):
                return str(v)
    return key


def caption_fields(
    sample: Mapping[str, object],
    rng: np.random.Generator | None = None,
    limits: DecodeLimits | None = None,
    wanted: Sequence[str] = schema.CAPTION_FIELDS,
) -> dict[str, str]:
    """Captions by field (the ``wanted`` ones of schema.TEXT_FIELDS) from the ``json`` member, plus
    ``txt`` as the vision caption (img2dataset / OpenCLIP shards). A field holding a list of captions
    yields one of them: random in training (``rng`` given), the first otherwise. Values that are not
    captions (:func:`is_caption`) are ignored."""
    lim = L.resolve(limits)
    for ext in (schema.JSON_EXT, schema.TXT_EXT):
        raw = sample.get(ext)
        if raw is not None:
            L.check("json_bytes", len(raw), lim, f"{ext} member of {len(raw)} bytes")
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
        for field in schema.TEXT_FIELDS:
            if field not in wanted:
                continue
            v = caps.get(field)
            if isinstance(v, list):
                v = [x for x in v if is_caption(x)]
                v = (v[int(rng.integers(len(v)))] if rng is not None else v[0]) if v else None
            if is_caption(v):
                out[field] = v.strip()
    txt = sample.get(schema.TXT_EXT)
    if txt is not None and "vision" in wanted and "vision" not in out:
        try:
            t = txt.decode("utf-8").strip() if isinstance(txt, bytes) else str(txt).strip()
        except UnicodeDecodeError as e:
            raise SkipSample("bad_text", str(e)) from None
        if is_caption(t):
            out["vision"] = t
    return out


def join_captions(fields: Mapping[str, str]) -> str:
    """Captions of a sample concatenated in schema order with the separator (MiCo Eq. 2)."""
    return schema.CAPTION_SEP.join(fields[f] for f in schema.TEXT_FIELDS if fields.get(f))


# ----------------------------------------------------------------------------- whole samples


class SampleDecoder:
    """Decode one raw sample into the tensors of ``modalities`` (see module docstring).

    Raises :class:`SkipSample` with a reason (``missing_modality``, ``bad_<modality>``, ``bad_json``,
    ``missing_caption``, ``no_audio_stream``, a cap's reason of ``mico_ds.data.read.limits``,
    ``decode_error``) for samples that cannot be used. Extra members are ignored. Spatial modalities
    share one crop, chosen on the image (else video, depth, normal) geometry. ``limits`` default to
    ``data.limits``' defaults. ``audio`` may come from a video member's track (module docstring).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        inputs: InputConfig,
        train: bool,
        require_caption: bool = True,
        limits: DecodeLimits | None = None,
        caption_fields: Sequence[str] = schema.CAPTION_FIELDS,
    ) -> None:
        bad = [m for m in modalities if m not in schema.MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}; known: {schema.MODALITIES}")
        # Canonical order: the crop is chosen by the first spatial modality (image before video ...).
        self.modalities = [m for m in schema.MODALITIES if m in modalities]
        self.inputs = inputs
        self.train = train
        self.require_caption = require_caption
        self.limits = L.resolve(limits)
        self.caption_fields = tuple(caption_fields)

    def _check_sizes(self, sample: Mapping[str, object], used: list[str]) -> None:
        """The member-size cap on every member the sample uses, those ``iter_tar`` left unread first."""
        oversized: Mapping[str, int] = sample.get(OVERSIZED) or {}  # type: ignore[assignment]
        for name in used:
            if name in oversized:  # the reader's cap (the same data.limits in a run): never read
                raise SkipSample(L.TOO_LARGE_MEMBER, f"member {name!r} of {oversized[name]} bytes, not read")
            data = sample.get(name)
            size = len(data) if isinstance(data, (bytes, bytearray, memoryview, str)) else 0
            L.check("member_bytes", size, self.limits, f"member {name!r}")

    def __call__(self, sample: Mapping[str, object], rng: np.random.Generator | None = None) -> dict:
        """Raw sample -> {"key", <modality>: tensor (uint8 for image/video/normal), "fields": {...}}."""
        names = [*sample, *(sample.get(OVERSIZED) or {})]  # type: ignore[misc]
        members = {}
        for m in self.modalities:
            name = find_member(names, m, audio_track=True)
            if name is None:
                raise SkipSample("missing_modality", m)
            members[m] = name
        used = [n for n in names if n in (schema.JSON_EXT, schema.TXT_EXT)]
        for name in dict.fromkeys(members.values()):  # a video serving video and audio is one member
            used += frame_members(names) if name == FRAMES else [name]
        self._check_sizes(sample, used)
        try:
            fields = caption_fields(sample, rng if self.train else None, self.limits, self.caption_fields)
        except SkipSample:
            raise
        except Exception as e:
            raise SkipSample(DECODE_ERROR, f"captions: {type(e).__name__}: {e}") from e
        if self.require_caption and not fields:
            raise SkipSample("missing_caption", f"none of the caption fields {list(self.caption_fields)}")
        key = str(sample.get("__key__", ""))
        out: dict = {"key": key, "fields": fields, "source": source_key(sample, key)}
        crop: Crop | None = None
        for m in self.modalities:
            try:
                out[m], crop = self._decode(m, members[m], sample, rng, crop)
            except SkipSample:
                raise
            except Exception as e:  # a decoding library's surprise: this sample only, never the worker
                raise SkipSample(DECODE_ERROR, f"{m} member {members[m]!r}: {type(e).__name__}: {e}") from e
        return out

    def _decode(
        self,
        m: str,
        name: str,
        sample: Mapping[str, object],
        rng: np.random.Generator | None,
        crop: Crop | None,
    ) -> tuple[torch.Tensor, Crop | None]:
        inp, train, lim = self.inputs, self.train, self.limits
        if m == "image":
            return decode_image(sample[name], inp, train, rng, crop, as_uint8=True, limits=lim)
        if m == "video":
            if name == FRAMES:
                frames = [sample[k] for k in frame_members(sample)]
                return decode_frames(frames, inp, train, rng, crop, as_uint8=True, limits=lim)
            return decode_video(sample[name], inp, train, rng, crop, as_uint8=True, limits=lim)
        if m == "audio":
            return decode_audio(sample[name], name, inp, train, rng, limits=lim), crop
        if m == "depth":
            return decode_depth(sample[name], name, inp, train, rng, crop, limits=lim)
        return decode_normal(sample[name], inp, train, rng, crop, as_uint8=True, limits=lim)


def finalize(name: str, x: torch.Tensor, inputs: InputConfig) -> torch.Tensor:
    """Turn a stacked internal tensor of modality ``name`` into the model's float input."""
    if name in ("image", "video"):
        return normalize_image(x, inputs)
    if name == "normal":
        return normals_to_float(x)
    return x
