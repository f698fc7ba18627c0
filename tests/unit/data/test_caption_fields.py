"""data.corpora[].caption_fields: which caption fields of the json make a sample's text (MiCo Eq. 2),
including the omni caption that VAST-27M (vast_cap) and VALOR (desc) carry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mico_ds.config import CorpusConfig, load_config
from mico_ds.data import schema
from mico_ds.data.read.decode import SampleDecoder
from mico_ds.data.read.loader import CorpusLoader, EvalLoader
from mico_ds.data.write import media
from tests.unit.data.test_pipeline import INP, data_cfg, write_tar

CAPS = {
    "vision": ["a dog runs", "a brown dog on grass"],
    "audio": ["a dog barks"],
    "subtitle": "good boy",
    "omni": "a brown dog runs on the grass and barks while someone says good boy",
}


def sample(key: str, caps: dict, img: bytes) -> dict:
    return {"__key__": key, "jpg": img, "json": json.dumps({"captions": caps}).encode()}


@pytest.fixture(scope="module")
def jpg() -> bytes:
    return media.encode_jpeg(np.full((16, 16, 3), 128, np.uint8))


def test_default_fields_join_vision_audio_subtitle_and_ignore_omni(jpg: bytes) -> None:
    out = SampleDecoder(["image"], INP, train=False)(sample("a", CAPS, jpg))
    assert out["fields"] == {"vision": "a dog runs", "audio": "a dog barks", "subtitle": "good boy"}


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (["omni"], CAPS["omni"]),
        (["vision"], "a dog runs"),
        (["audio", "vision"], "a dog runs ; a dog barks"),  # joined in schema order, not the list's
    ],
)
def test_selected_fields_only(jpg: bytes, fields: list[str], text: str) -> None:
    from mico_ds.data.read.decode import join_captions

    out = SampleDecoder(["image"], INP, train=False, caption_fields=fields)(sample("a", CAPS, jpg))
    assert set(out["fields"]) == set(fields)
    assert join_captions(out["fields"]) == text


def test_a_sample_without_the_selected_field_is_missing_caption(jpg: bytes) -> None:
    from mico_ds.data.read.skips import SkipSample

    dec = SampleDecoder(["image"], INP, train=False, caption_fields=["omni"])
    with pytest.raises(SkipSample) as e:
        dec(sample("a", {"vision": "a dog"}, jpg))
    assert e.value.reason == "missing_caption" and "omni" in e.value.detail


def test_corpus_loader_trains_on_the_omni_caption(tmp_path: Path, jpg: bytes) -> None:
    caps = [dict(CAPS, omni=f"omni caption {i}") for i in range(4)]
    write_tar(tmp_path / "vast-000000.tar", [
        (f"c{i}", {"jpg": jpg, "json": json.dumps({"captions": c}).encode()}) for i, c in enumerate(caps)
    ])  # fmt: skip
    corpus = CorpusConfig(
        name="vast", shards="vast-000000.tar", modalities=["image"], batch_size=4, caption_fields=["omni"]
    )
    b = next(CorpusLoader(corpus, INP, data_cfg(tmp_path, tokenizer=""), seed=0, rank=0, world_size=1))
    assert sorted(b[schema.CAPTIONS]) == [f"omni caption {i}" for i in range(4)]


def test_eval_loader_takes_data_val_caption_fields(tmp_path: Path, jpg: bytes) -> None:
    write_tar(tmp_path / "val-000000.tar", [
        (f"v{i}", {"jpg": jpg, "json": json.dumps({"captions": dict(CAPS, omni=f"omni {i}")}).encode()})
        for i in range(3)
    ] + [("only_vision", {"jpg": jpg, "json": b'{"captions": {"vision": "x"}}'})])  # fmt: skip
    data = data_cfg(tmp_path, tokenizer="", val_caption_fields=["omni"])
    ev = EvalLoader(
        "val-000000.tar", ["image"], INP, data, batch_size=8, tokenizer=None, rank=0, world_size=1
    )
    (b,) = list(ev)
    assert b[schema.CAPTIONS] == ["omni 0", "omni 1", "omni 2"] and b[schema.EVAL_TEXTS] == [
        ["omni 0"],
        ["omni 1"],
        ["omni 2"],
    ]
    assert ev.skip_stats()["skipped"] == {"missing_caption": 1}
    default = EvalLoader("val-000000.tar", ["image"], INP, data_cfg(tmp_path, tokenizer=""), batch_size=8,
                         tokenizer=None, rank=0, world_size=1)  # fmt: skip
    assert next(iter(default))[schema.CAPTIONS][0] == "a dog runs ; a dog barks ; good boy"


def test_eval_texts_take_caption_alternatives_of_the_selected_fields_only(jpg: bytes) -> None:
    from mico_ds.data.read.batch import eval_extras

    item = sample("a", CAPS, jpg)
    omni = SampleDecoder(["image"], INP, train=False, caption_fields=["omni"])(item)["fields"]
    assert eval_extras(item, omni)[schema.EVAL_TEXTS] == [CAPS["omni"]]
    default = SampleDecoder(["image"], INP, train=False)(item)["fields"]
    assert eval_extras(item, default)[schema.EVAL_TEXTS] == [
        "a dog runs ; a dog barks ; good boy",
        "a brown dog on grass ; a dog barks ; good boy",
    ]


def test_caption_fields_are_checked_and_reach_the_config() -> None:
    with pytest.raises(ValueError, match=r"caption_fields=\['vison'\]"):
        CorpusConfig(name="x", caption_fields=["vison"])
    with pytest.raises(ValueError, match="at least one"):
        CorpusConfig(name="x", caption_fields=[])
    cfg = load_config("debug", ["data.corpora.0.caption_fields=[omni]", "data.val_caption_fields=[omni]"])
    assert cfg.data.corpora[0].caption_fields == ["omni"] and cfg.data.val_caption_fields == ["omni"]
    with pytest.raises(ValueError, match=r"data.val_caption_fields=\['omin'\]"):
        load_config("debug", ["data.val_caption_fields=[omin]"])


def test_source_group_is_the_json_video_id_else_the_key(jpg: bytes) -> None:
    """Clips of one video share a source group (hard-negative mining never pairs them); a sample
    without a video_id is its own group."""
    from mico_ds.data.read.batch import collate

    dec = SampleDecoder(["image"], INP, train=False)
    raws = [sample(k, CAPS, jpg) for k in ("v1.1", "v1.2", "v2.1", "solo")]
    for raw, vid in zip(raws, ["v1", "v1", "v2", None]):
        if vid:
            raw["json"] = json.dumps({"captions": CAPS, "video_id": vid}).encode()
    batch = collate([dec(r) for r in raws], ["image"], INP)
    g = batch[schema.SOURCE_GROUP].tolist()
    assert g[0] == g[1] == schema.source_group("v1") and g[2] == schema.source_group("v2")
    assert g[3] == schema.source_group("solo") and len(set(g)) == 3
