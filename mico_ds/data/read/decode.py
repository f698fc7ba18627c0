"""Whole samples: a raw sample (``mico_ds.data.io``) -> the tensors of the modalities a corpus
declares, and its captions (docs/architecture.md, "Data contract").

:class:`SampleDecoder` drives the per-modality decoders (``visual``, ``audio``) with
:class:`mico_ds.config.InputConfig`. Training randomness comes only from the
``numpy.random.Generator`` passed in, which the stream derives from (seed, epoch, stream position)
so that a resumed run reproduces every crop, frame and caption choice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mico_ds.config import InputConfig
from mico_ds.data import schema
from mico_ds.data.io import FRAMES, find_member, frame_members
from mico_ds.data.read.audio import decode_audio
from mico_ds.data.read.skips import SkipSample
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
                if name == FRAMES:
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
