"""The built-in synthetic demo corpus (``world``: attributes, captions, renderers; ``corpus``: the
shards and tokenizer written from them). Kept out of the core data package: a run uses it only when
its recipe sets ``demo.generate``."""

from mico_ds.demo.corpus import FORMAT_VERSION, INDEX_FILE, draw_codes, ensure_demo_corpus, make_demo_corpus
from mico_ds.demo.world import (
    BACKGROUND,
    COLOURS,
    DEPTH_VIEW_MM,
    DEPTH_WALL_MM,
    NUM_COMBINATIONS,
    NUMBER_WORDS,
    PITCHES,
    QA_TYPES,
    SHAPES,
    DemoParams,
    captions_for,
    decode_attributes,
    joined_caption,
    qa_for,
)

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DEPTH_VIEW_MM",
    "DEPTH_WALL_MM",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "NUMBER_WORDS",
    "NUM_COMBINATIONS",
    "PITCHES",
    "QA_TYPES",
    "SHAPES",
    "DemoParams",
    "captions_for",
    "decode_attributes",
    "draw_codes",
    "ensure_demo_corpus",
    "joined_caption",
    "make_demo_corpus",
    "qa_for",
]
