"""The trainer's view of the data: the demo corpus when the recipe asks for it, then the tokenizer."""

from __future__ import annotations

from mico_ds import distributed as mdist
from mico_ds.config import RunConfig
from mico_ds.data.tokenizer import Tokenizer, run_tokenizer


def prepare_data(cfg: RunConfig) -> Tokenizer:
    """Generate the demo corpus when ``demo.generate`` is set (every rank may call: generation is
    serialized by a file lock), then load the run's tokenizer (``data.tokenizer`` is set to its path)."""
    if cfg.demo.generate:
        from mico_ds.demo import ensure_demo_corpus

        ensure_demo_corpus(
            cfg.data.root,
            num_train=cfg.demo.num_train,
            num_val=cfg.demo.num_val,
            num_tune=cfg.demo.num_tune,
            num_pair_heldout=cfg.demo.num_pair_heldout,
            progress=mdist.is_main_process(),
        )
    return run_tokenizer(cfg.data, cfg.demo)
