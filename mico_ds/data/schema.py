"""The data contract (docs/architecture.md, "Data contract"): shard member names, modality order, batch keys.

Every part that reads or writes shards or batches imports its names from here, so the contract
lives in one place.

Batch legend (what ``MiCoModel.forward`` receives; B = batch, T = frames, N = audio clips):
    image   float32 (B, 3, H, W)      normalized RGB
    video   float32 (B, T, 3, H, W)   normalized RGB frames
    audio   float32 (B, N, 1, F, Tm)  normalized log-mel filterbank clips (F mel bins, Tm frames)
    depth   float32 (B, 1, H, W)      depth, normalized per sample to zero mean / unit std
    normal  float32 (B, 3, H, W)      surface normals in [-1, 1]
    text_ids       int64 (B, L)  captions of the present modalities, concatenated (MiCo Eq. 2)
    text_mask      int64 (B, L)  1 for real tokens, 0 for padding
    sample_source  int64 (B, M)  per present modality (in MODALITIES order) the id of the corpus it was
                                 drawn from when a sample is joined from several corpora (MiCo Eq. 3);
                                 all zeros for samples that come whole from one corpus
    text_source    int64 (B, L)  joined batches only: per token, the source_id of the corpus its caption
                                 came from (E_Sam of the text features, MiCo Eq. 3); BOS and each
                                 separator go with the caption after them, EOS with the last; 0 on
                                 padding
    source_group   int64 (B,)    hash of the sample's source key (json "video_id", else its key; joined
                                 samples combine their parts'): clips of one video share it, and hard-
                                 negative mining never draws a candidate of the positive's group
    keys           list[str]     sample keys
    captions       list[str]     the concatenated raw caption (evaluation, CIDEr)
    corpus         str           name of the corpus the batch came from
  evaluation batches only (EvalLoader; training batches never carry them):
    eval_texts     list[list[str]]  every text of each item: one concatenated caption per caption
                                 alternative (COCO-style lists in the json), the first = captions[i]
    qa             list[list[dict]]  question/answer pairs {"q", "a", ...} of each item (json "qa")
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

# Knowledge modalities in their canonical order: the multimodal context concatenates present
# modalities in this order, and modality ids (E_M rows) are indices into this tuple.
Modality = Literal["image", "video", "audio", "depth", "normal"]
MODALITIES: tuple[str, ...] = typing.get_args(Modality)
MODALITY_ID: dict[str, int] = {m: i for i, m in enumerate(MODALITIES)}

# Caption fields of a sample's ``json`` member, in the order they are concatenated (Eq. 2).
CAPTION_FIELDS: tuple[str, ...] = ("vision", "audio", "subtitle", "depth")
# A caption of the whole sample written by a captioner that saw every modality (VAST-27M's
# ``vast_cap``, VALOR's ``desc``); a corpus uses it only when its ``caption_fields`` name it.
OMNI_FIELD = "omni"
# Every caption field a json may carry, in concatenation order; CAPTION_FIELDS are the default text.
TEXT_FIELDS: tuple[str, ...] = (*CAPTION_FIELDS, OMNI_FIELD)
# Separator placed between concatenated captions.
CAPTION_SEP = " ; "

# Shard member extensions per modality (first match wins when several are present).
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS: tuple[str, ...] = ("mp4", "webm", "gif")
FRAME_PREFIX = "frame"  # pre-extracted video frames: frame0.jpg, frame1.jpg, ...
AUDIO_EXTS: tuple[str, ...] = ("flac", "wav", "mp3", "m4a", "aac", "ogg", "opus")
# Video members whose own audio stream serves ``audio`` when a sample has no audio member (a GIF has
# no sound; pre-extracted frames have no track).
AUDIO_TRACK_EXTS: tuple[str, ...] = ("mp4", "webm")
DEPTH_EXTS: tuple[str, ...] = ("depth.png", "depth.npy")
NORMAL_EXTS: tuple[str, ...] = ("normal.png",)
JSON_EXT = "json"
TXT_EXT = "txt"

# Keys of the tensors/metadata in a batch.
TEXT_IDS = "text_ids"
TEXT_MASK = "text_mask"
SAMPLE_SOURCE = "sample_source"
TEXT_SOURCE = "text_source"
SOURCE_GROUP = "source_group"
KEYS = "keys"
CAPTIONS = "captions"
CORPUS = "corpus"
EVAL_TEXTS = "eval_texts"
QA = "qa"
# (B, L) bool, set by a task (mico_ds.tasks): the generation objective predicts exactly these tokens
# (each from the tokens before it, <mask> at its own position) instead of a random mask_ratio of them.
GEN_TARGETS = "gen_targets"

# The json field naming the recording a clip was cut from (HD-VILA / VAST-27M / MSR-VTT "video_id").
SOURCE_KEY_FIELD = "video_id"


def source_group(source_key: str) -> int:
    """A stable signed 63-bit id of a source key (the same in every process and run)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(source_key.encode(), digest_size=8).digest(), "little") >> 1


# Size index written next to shards by tools/make_shards.py: {"shard-000000.tar": n_samples, ...}
SIZES_FILE = "sizes.json"


@dataclass(frozen=True)
class SpecialTokens:
    """What the model needs to know of the tokenizer (built by mico_ds.data.tokenizer)."""

    vocab_size: int  # len(tokenizer), including added tokens such as <mask> and <pad>
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int  # the generation objective's <mask> (MiCo Eq. 6)
