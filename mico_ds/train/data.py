"""The trainer's view of the data: demo generation, tokenizer, the training mixture, evaluation batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mico_ds import distributed as mdist
from mico_ds.config import RunConfig
from mico_ds.data.mixture import MixtureLoader, build_eval_loader, build_train_loader
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


def eval_batches(
    cfg: RunConfig, tokenizer: Tokenizer, device: torch.device, bf16: bool
) -> tuple[Iterator[dict[str, Any]], int]:
    """This rank's held-out batches, padded to the same count on every rank.

    ZeRO-3 gathers parameters collectively, so every rank must run the same number of forward passes:
    ranks with fewer batches repeat their last one with ``valid`` all False.
    """
    from mico_ds.data.pipeline import to_device

    loader = build_eval_loader(cfg, str(tokenizer_path(cfg)))
    batches = []
    for b in loader:
        b["valid"] = torch.ones(len(b["keys"]), dtype=torch.bool)
        batches.append(to_device(b, device, bf16))
    n = int(mdist.dist_max(torch.tensor([len(batches)])).item())
    if not batches:
        raise ValueError(
            f"rank {mdist.get_rank()} got no held-out samples from {cfg.data.val_shards}: "
            f"fewer samples than ranks?"
        )
    while len(batches) < n:
        pad = dict(batches[-1])
        pad["valid"] = torch.zeros_like(pad["valid"])
        batches.append(pad)
    return iter(batches), n
