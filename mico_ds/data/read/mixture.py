"""Mixing corpora step by step, joined samples, and the loaders a run builds from its config.

* :class:`Schedule` -- which corpus each step draws from (MiCo appendix B.2: every corpus has its
  own batch size and number of steps). A pure function of (seed, step): every rank computes the
  same corpus for the same step without any broadcast, and a resumed run knows where it is.
* :class:`JoinedLoader` -- MiCo Eq. 3: a corpus built by drawing one pair from each of several
  single-pair corpora (image-text, audio-text, video-text, ...) and joining them into one
  multimodal sample; ``sample_source`` records which corpus each modality came from (E_Sam rows).
* :class:`MixtureLoader` -- the trainer's iterator: ``next()`` gives the batch of the scheduled
  corpus; ``state_dict()`` holds the step and every corpus loader's stream positions.
* :func:`build_train_loader` / :func:`build_eval_loader` -- both from a :class:`RunConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from mico_ds.config import CorpusConfig, DataConfig, InputConfig, RunConfig
from mico_ds.data import schema
from mico_ds.data.apportion import largest_remainder
from mico_ds.data.read.batch import token_sources, tokenize_into
from mico_ds.data.read.decode import join_captions
from mico_ds.data.read.loader import FROM_DATA, CorpusLoader, EvalLoader
from mico_ds.data.tokenizer import TextTokenizer, resolve_tokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Period of the schedule when corpora are mixed by weight and the run length is unknown.
DEFAULT_PERIOD = 1000


class BatchSource(Protocol):
    def __next__(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def skip_stats(self) -> dict: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------- schedule


def step_counts(corpora: Sequence[CorpusConfig], total_steps: int | None) -> list[int]:
    """Steps of each corpus in one period of the schedule (appendix B.2).

    Corpora with ``steps`` set get exactly that many; the others share the remaining
    ``total_steps - sum(steps)`` by ``weight`` (largest remainder). Without ``total_steps`` the
    weights share a period of :data:`DEFAULT_PERIOD` steps.

    Raises:
        ValueError: naming the values when steps/weights are negative, the fixed steps exceed
            total_steps, or no corpus gets a step.
    """
    for c in corpora:
        if c.steps is not None and c.steps < 0 or c.weight < 0:
            raise ValueError(f"corpus {c.name!r}: steps={c.steps} and weight={c.weight} must be >= 0")
    fixed = sum(c.steps for c in corpora if c.steps is not None)
    free = [c for c in corpora if c.steps is None]
    if free and any(c.weight > 0 for c in free):
        if total_steps is None:
            if fixed:
                raise ValueError(
                    f"corpora {[c.name for c in corpora if c.steps is not None]} set steps (sum {fixed}) "
                    f"and {[c.name for c in free]} weights: mixing them needs the run length (max_steps)"
                )
            rest = DEFAULT_PERIOD
        else:
            rest = total_steps - fixed
            if rest <= 0:
                raise ValueError(
                    f"corpora with steps set use {fixed} steps >= total_steps={total_steps}: nothing left "
                    f"for the weighted corpora {[c.name for c in free]}"
                )
        shares = iter(int(n) for n in largest_remainder(rest, [c.weight for c in free]))
        counts = [c.steps if c.steps is not None else next(shares) for c in corpora]
    else:
        counts = [c.steps if c.steps is not None else 0 for c in corpora]
        if total_steps is not None and fixed and fixed != total_steps:
            log.warning(
                "corpus steps sum to %d but the run has %d steps: the schedule repeats every %d steps",
                fixed,
                total_steps,
                fixed,
            )
    if sum(counts) == 0:
        raise ValueError(f"no corpus gets a step: steps/weights of {[c.name for c in corpora]} are all 0")
    return counts


class Schedule:
    """step -> corpus index: each period of ``sum(counts)`` steps holds exactly ``counts[i]`` steps of
    corpus i, in an order drawn from (seed, period). Identical on every rank; no communication."""

    def __init__(self, counts: Sequence[int], seed: int) -> None:
        if any(c < 0 for c in counts) or sum(counts) == 0:
            raise ValueError(f"schedule counts must be >= 0 and not all 0, got {list(counts)}")
        self.counts = [int(c) for c in counts]
        self.period = sum(self.counts)
        self.seed = seed
        self._cached: tuple[int, np.ndarray] | None = None
        self._base = np.repeat(np.arange(len(self.counts)), self.counts)

    def _order(self, period: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != period:
            rng = np.random.default_rng([self.seed, period, 0x5C4ED])
            self._cached = (period, rng.permutation(self._base))
        return self._cached[1]

    def __call__(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return int(self._order(step // self.period)[step % self.period])

    def counts_before(self, step: int) -> list[int]:
        """How many of the steps [0, step) each corpus had."""
        full, rem = divmod(step, self.period)
        out = [c * full for c in self.counts]
        if rem:
            for i, n in enumerate(np.bincount(self._order(full)[:rem], minlength=len(self.counts))):
                out[i] += int(n)
        return out


# ----------------------------------------------------------------------------- joined corpora


class JoinedLoader:
    """Batches of samples joined from single-pair corpora (MiCo Eq. 3).

    Sample b of a batch is the b-th sample of each source's batch: modalities are the union of the
    sources' (which must be disjoint), captions are merged field by field in schema order (Eq. 2),
    keys are joined with "+", and ``sample_source[b, m]`` is the ``source_id`` of the corpus that
    modality m (in MODALITIES order among the present ones) came from.

    Args:
        name: the joined corpus's name (the ``corpus`` of its batches).
        sources: one loader per source corpus, each yielding this corpus's batch size, with the
            samples' caption fields (:meth:`CorpusLoader.next_with_fields`).
        source_ids: ``CorpusConfig.source_id`` of each source.
        source_modalities: modalities of each source.
        tokenizer: tokenizes the merged captions in the main process.
    """

    def __init__(
        self,
        name: str,
        sources: Sequence[CorpusLoader],
        source_ids: Sequence[int],
        source_modalities: Sequence[Sequence[str]],
        tokenizer: str | TextTokenizer | None,
        text_max_len: int,
    ) -> None:
        seen: dict[str, int] = {}
        for i, mods in enumerate(source_modalities):
            for m in mods:
                if m in seen:
                    raise ValueError(
                        f"joined corpus {name!r}: modality {m!r} comes from two sources "
                        f"({sources[seen[m]].corpus.name!r} and {sources[i].corpus.name!r})"
                    )
                seen[m] = i
        self.name = name
        self.sources = list(sources)
        self.modalities = [m for m in schema.MODALITIES if m in seen]
        self.source_of = [source_ids[seen[m]] for m in self.modalities]  # per present modality
        self.source_ids = list(source_ids)
        self.tokenizer = tokenizer
        self.text_max_len = text_max_len

    def __iter__(self) -> JoinedLoader:
        return self

    def __next__(self) -> dict:
        parts, part_fields = zip(*(s.next_with_fields() for s in self.sources))
        n = min(len(p[schema.KEYS]) for p in parts)
        batch: dict[str, Any] = {}
        for p in parts:
            for m in schema.MODALITIES:
                if m in p:
                    batch[m] = p[m][:n]
        batch = {m: batch[m] for m in self.modalities}
        fields, pieces = [], []
        for b in range(n):
            merged: dict[str, str] = {}
            mine: list[tuple[str, int]] = []  # (caption, source id) in the order they are joined
            for f in schema.TEXT_FIELDS:
                texts = [(pf[b][f], sid) for pf, sid in zip(part_fields, self.source_ids) if pf[b].get(f)]
                if texts:
                    merged[f] = schema.CAPTION_SEP.join(t for t, _ in texts)
                    mine.extend(texts)
            fields.append(merged)
            pieces.append(mine)
        batch[schema.KEYS] = ["+".join(p[schema.KEYS][b] for p in parts) for b in range(n)]
        batch[schema.CAPTIONS] = [join_captions(f) for f in fields]
        batch[schema.SAMPLE_SOURCE] = torch.tensor([self.source_of] * n, dtype=torch.int64).view(n, -1)
        # A joined sample's group names all of its parts (two joins share it only if every part does).
        groups = [[str(int(g)) for g in p[schema.SOURCE_GROUP][:n]] for p in parts]
        batch[schema.SOURCE_GROUP] = torch.tensor(
            [schema.source_group("+".join(gs)) for gs in zip(*groups)], dtype=torch.int64
        )
        batch[schema.CORPUS] = self.name
        tok = resolve_tokenizer(self.tokenizer)
        tokenize_into(batch, batch[schema.CAPTIONS], tok, self.text_max_len)
        if tok is not None:
            ids, mask = batch[schema.TEXT_IDS], batch[schema.TEXT_MASK]
            batch[schema.TEXT_SOURCE] = token_sources(pieces, ids, mask, tok)
        return batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "sources": {s.corpus.name: s.state_dict() for s in self.sources}}

    def load_state_dict(self, state: dict) -> None:
        missing = [s.corpus.name for s in self.sources if s.corpus.name not in state.get("sources", {})]
        if missing:
            raise ValueError(f"joined corpus {self.name!r}: data state lacks sources {missing}")
        for s in self.sources:
            s.load_state_dict(state["sources"][s.corpus.name])

    def skip_stats(self) -> dict:
        seen, skipped, examples = 0, {}, {}
        for s in self.sources:
            st = s.skip_stats()
            seen += st["seen"]
            for r, k in st["skipped"].items():
                skipped[f"{s.corpus.name}:{r}"] = k
            for r, k in st["examples"].items():
                examples[f"{s.corpus.name}:{r}"] = k
        return {"seen": seen, "skipped": skipped, "examples": examples}

    def close(self) -> None:
        for s in self.sources:
            s.close()


# ----------------------------------------------------------------------------- mixture


class MixtureLoader:
    """The trainer's data iterator: one batch per ``next()``, from the corpus the schedule names.

    Args:
        loaders: a loader per scheduled corpus, by corpus name.
        corpora: the corpora configs (order defines schedule indices); corpora whose count is 0
            (e.g. sources used only inside a join) need no loader.
        seed: schedule seed (train.seed).
        total_steps: run length in ``next()`` calls (max_steps x grad_accum), to share steps among
            weighted corpora; see :func:`step_counts`.
    """

    def __init__(
        self,
        loaders: Mapping[str, BatchSource],
        corpora: Sequence[CorpusConfig],
        *,
        seed: int,
        total_steps: int | None = None,
    ) -> None:
        self.names = [c.name for c in corpora]
        counts = step_counts(corpora, total_steps)
        missing = [n for n, k in zip(self.names, counts) if k > 0 and n not in loaders]
        if missing:
            raise ValueError(f"scheduled corpora {missing} have no loader (have {sorted(loaders)})")
        self.loaders = dict(loaders)
        self.schedule = Schedule(counts, seed)
        self.step = 0
        log.info("corpus steps per period of %d: %s", self.schedule.period, dict(zip(self.names, counts)))

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict:
        name = self.names[self.schedule(self.step)]
        batch = next(self.loaders[name])
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """``{"version", "step", "corpora": {name: loader state}}`` -- small and JSON-able."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "corpora": {n: ld.state_dict() for n, ld in self.loaders.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"mixture data state version {state.get('version')} != {STATE_VERSION}")
        missing = [n for n in self.loaders if n not in state.get("corpora", {})]
        if missing:
            raise ValueError(
                f"data state has no entry for corpora {missing} (has {sorted(state['corpora'])})"
            )
        for n, ld in self.loaders.items():
            ld.load_state_dict(state["corpora"][n])
        self.step = int(state["step"])

    def fast_forward(self, step: int) -> None:
        """Continue the schedule at ``step`` without stream positions (e.g. another world size):
        the corpus order is right, the sample streams restart from their beginning."""
        log.warning("data: no stream state; schedule continues at step %d, sample streams restart", step)
        self.step = int(step)

    def skip_counts(self) -> dict[str, int]:
        """Flat counters for logging: ``{"<corpus>/seen": n, "<corpus>/<reason>": n, ...}``."""
        out: dict[str, int] = {}
        for n, ld in self.loaders.items():
            st = ld.skip_stats()
            out[f"{n}/seen"] = st["seen"]
            for r, k in st["skipped"].items():
                out[f"{n}/{r}"] = k
        return out

    def skip_stats(self) -> dict[str, dict]:
        return {n: ld.skip_stats() for n, ld in self.loaders.items()}

    def close(self) -> None:
        for ld in self.loaders.values():
            ld.close()


# ----------------------------------------------------------------------------- builders


def build_corpus_loader(
    corpus: CorpusConfig,
    by_name: Mapping[str, CorpusConfig],
    inputs: InputConfig,
    data: DataConfig,
    *,
    seed: int,
    tokenizer: str | TextTokenizer | None,
    rank: int | None = None,
    world_size: int | None = None,
    **loader_kwargs: Any,
) -> BatchSource:
    """A :class:`CorpusLoader`, or a :class:`JoinedLoader` when ``corpus.joined_from`` is set."""
    if not corpus.joined_from:
        return CorpusLoader(
            corpus,
            inputs,
            data,
            seed=seed,
            tokenizer=tokenizer,
            rank=rank,
            world_size=world_size,
            **loader_kwargs,
        )
    srcs = [by_name[n] for n in corpus.joined_from]
    union = {m for s in srcs for m in s.modalities}
    if set(corpus.modalities) != union:
        raise ValueError(
            f"joined corpus {corpus.name!r} declares modalities {corpus.modalities} but its sources "
            f"{corpus.joined_from} carry {sorted(union)}"
        )
    loaders = [
        CorpusLoader(
            CorpusConfig(
                name=s.name,
                shards=s.shards,
                modalities=list(s.modalities),
                batch_size=corpus.batch_size,
                resampled=s.resampled or corpus.resampled,  # set on the join: all its sources' copies
                caption_fields=list(s.caption_fields),
            ),
            inputs,
            data,
            seed=seed,
            tokenizer=None,  # the join tokenizes the merged captions
            rank=rank,
            world_size=world_size,
            salt=f"{corpus.name}/{s.name}",  # its own order, not the standalone corpus's
            **loader_kwargs,
        )
        for s in srcs
    ]
    return JoinedLoader(
        corpus.name,
        loaders,
        [s.source_id for s in srcs],
        [s.modalities for s in srcs],
        tokenizer,
        data.text_max_len,
    )


def build_train_loader(
    cfg: RunConfig,
    tokenizer: str | TextTokenizer | None = FROM_DATA,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    **loader_kwargs: Any,
) -> MixtureLoader:
    """The training :class:`MixtureLoader` of a run: one loader per corpus with a share of steps.

    ``tokenizer`` defaults to ``cfg.data.tokenizer`` (loaded in every worker); ``loader_kwargs``
    (num_workers, pin_memory, multiprocessing_context, prefetch_factor) go to every CorpusLoader.
    The run's task (``task.name``, ``mico_ds.tasks``) checks the config and may give the corpora's
    streams its :class:`~mico_ds.tasks.base.SampleTask`.
    """
    from mico_ds import tasks

    data = cfg.data
    if not data.corpora:
        raise ValueError("data.corpora is empty: no training corpus configured")
    task = tasks.get(cfg.task.name)
    task.check(cfg)
    sample_task = task.sample_task(cfg)
    if sample_task is not None:  # pretrain passes nothing: its loaders are built as they always were
        loader_kwargs = {**loader_kwargs, "task": sample_task}
    tok = data.tokenizer if tokenizer == FROM_DATA else tokenizer
    total = cfg.train.max_steps * cfg.optim.grad_accum
    counts = step_counts(data.corpora, total)
    by_name = {c.name: c for c in data.corpora}
    loaders = {
        c.name: build_corpus_loader(
            c, by_name, cfg.inputs, data, seed=cfg.train.seed, tokenizer=tok, rank=rank,
            world_size=world_size, **loader_kwargs,
        )
        for c, k in zip(data.corpora, counts)
        if k > 0
    }  # fmt: skip
    return MixtureLoader(loaders, data.corpora, seed=cfg.train.seed, total_steps=total)


def build_eval_loader(
    cfg: RunConfig,
    tokenizer: str | TextTokenizer | None = FROM_DATA,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    max_samples: int | None = None,
) -> EvalLoader:
    """One eval-mode pass over ``data.val_shards`` (``data.val_modalities``), ``eval.batch_size`` per
    rank, this rank's disjoint part; ``max_samples`` (per rank) defaults to
    ceil(eval.max_samples / world_size)."""
    if not cfg.data.val_shards:
        raise ValueError("data.val_shards is not set: no held-out shards to evaluate on")
    from mico_ds import distributed

    world = distributed.get_world_size() if world_size is None else world_size
    if max_samples is None and cfg.eval.max_samples:
        max_samples = -(-cfg.eval.max_samples // world)
    return EvalLoader(
        cfg.data.val_shards,
        cfg.data.val_modalities,
        cfg.inputs,
        cfg.data,
        batch_size=cfg.eval.batch_size,
        tokenizer=tokenizer,
        rank=rank,
        world_size=world,
        num_workers=num_workers,
        max_samples=max_samples,
    )
