"""The trainer's view of the data: demo generation, tokenizer, the training mixture."""

from __future__ import annotations

import logging
from pathlib import Path

from mico_ds import distributed as mdist
from mico_ds.config import RunConfig
from mico_ds.data.mixture import MixtureLoader, build_train_loader
from mico_ds.data.tokenizer import Tokenizer

log = logging.getLogger("mico_ds")


def tokenizer_path(cfg: RunConfig) -> Path:
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.data.generate_demo:
        return Path(cfg.data.root) / "tokenizer" / "tokenizer.model"
    raise ValueError(
        "data.tokenizer is not set: point it to a SentencePiece tokenizer.model (e.g. Llama-2's)"
    )


def prepare_data(cfg: RunConfig) -> Tokenizer:
    """Generate the demo corpus when the recipe asks for it (every rank may call: generation is
    serialized by a file lock), then load the tokenizer."""
    if cfg.data.generate_demo:
        from mico_ds.data.demo import ensure_demo_corpus

        ensure_demo_corpus(
            cfg.data.root,
            num_train=cfg.data.demo_num_train,
            num_val=cfg.data.demo_num_val,
            progress=mdist.is_main_process(),
        )
    path = tokenizer_path(cfg)
    if not path.exists():
        raise ValueError(f"data.tokenizer: {path} does not exist")
    cfg.data.tokenizer = str(path)
    return Tokenizer.from_path(path)


def build_train_data(cfg: RunConfig, tokenizer: Tokenizer) -> MixtureLoader:
    """The training mixture; workers load the tokenizer from its file themselves."""
    del tokenizer  # the path in cfg.data.tokenizer is what workers open
    return build_train_loader(cfg)
