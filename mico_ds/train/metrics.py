"""Run-directory outputs: metrics.jsonl, TensorBoard events, summary.json; throughput and MFU."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from mico_ds.config import RunConfig

log = logging.getLogger("mico_ds")


def drop_records_after(path: Path, step: int, keep_events: bool = False) -> int:
    """Rewrite a JSON-lines file without the records whose ``step`` is above ``step``; returns how many
    were dropped. A run killed after its last checkpoint logged steps that its resume runs again.
    With ``keep_events``, records with an ``event`` (a rollback keeps what it rolled back over) stay."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
            over = int(rec.get("step", 0)) > step and not (keep_events and "event" in rec)
        except (ValueError, AttributeError):
            over = True  # a line cut short by the kill
        if not over:
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    Only rank 0 writes; other ranks get a writer whose methods do nothing.
    """

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.tb = self._tensorboard(run_dir, None)

    @staticmethod
    def _tensorboard(run_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)
        except ImportError:  # tensorboard is a requirement, but logging must never stop a run
            return None

    def rewind(self, step: int, keep_events: bool = False) -> None:
        """On resume from ``step``: forget what was logged after it (metrics.jsonl and TensorBoard)."""
        if not self.enabled:
            return
        n = drop_records_after(self.path, step, keep_events)
        if n:
            log.warning("%s: dropped %d record(s) of steps after checkpoint step %d", self.path, n, step)
            if self.tb is not None:
                self.tb.close()
                self.tb = self._tensorboard(self.path.parent, step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class KeyLog:
    """Debug record of the samples each rank consumed (``train.record_keys``): one JSON line per
    micro-batch, ``{"step", "micro", "corpus", "keys"}``, in ``RUN_DIR/keys/rank{R}.jsonl``."""

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None) -> None:
        self.path = run_dir / "keys" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            drop_records_after(self.path, resume_step)

    def write(self, step: int, micro: int, batch: dict[str, Any]) -> None:
        rec = {"step": step, "micro": micro, "corpus": batch.get("corpus"), "keys": list(batch["keys"])}
        with open(self.path, "a") as f:  # closed at once: a kill -9 loses nothing written
            f.write(json.dumps(rec) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


class Throughput:
    """Samples/s over a sliding window of steps."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        r = self.samples / dt if dt > 0 else 0.0
        self.t0, self.samples = time.perf_counter(), 0
        return r


def flops_breakdown(
    cfg: RunConfig, modalities: list[str], text_len: int, vocab_size: int
) -> dict[str, float]:
    """FORWARD FLOPs per sample of each part of one MiCo training step (matmuls only), written out.

    A transformer layer of width d, MLP width f, sequence n costs forward
        2 * n * (4 d^2 + 2 d f)   (qkv + out projections, MLP; 2 FLOPs per multiply-add)
      + 4 * n^2 * d               (scores Q K^T and the weighted sum P V),
    as in Kaplan et al. 2020 / nanoGPT's estimate_mfu (6N + 12 L d n per token for training). A Llama
    layer (hidden H, MLP I, kv width H_kv = H * kv_heads / heads, SwiGLU) costs
        2 * n * (2 H^2 + 2 H H_kv + 3 H I) + 4 * n^2 * H.
    Parts (keys of the result):
        vit/<modality>   frames x depth x layer(n_grid + 1, D, F): one ViT pass per frame / clip
        context          fusion_layers x layer(1 + context tokens, D, F)
        llama/text       the text-only pass, n = text_len (contrastive text feature)
        llama/matching   3 x pass(prefix + text_len): positive + 2 hard-negative rows per sample (Eq. 5)
        llama/generation pass(prefix + text_len): the masked caption (Eq. 6)
        lm_head          2 * mask_ratio * text_len * H * V: the LM head runs on the masked tokens only
    Heads and projections (O(d^2) per sample, not per token) are left out.
    """
    v, t, inp, ctxc = cfg.model.vision, cfg.model.text, cfg.inputs, cfg.model.context

    def layer(n: int, d: int, f: int) -> float:
        return 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d

    grid = (inp.image_size // v.patch_size) ** 2 + 1
    agrid = (inp.mel_bins // v.audio_patch_size) * (inp.clip_frames // v.audio_patch_size) + 1
    frames = {"image": 1, "video": inp.num_frames, "audio": inp.num_clips, "depth": 1, "normal": 1}
    parts: dict[str, float] = {}
    ctx_len = 1
    for m in modalities:
        n = agrid if m == "audio" else grid
        parts[f"vit/{m}"] = frames[m] * v.depth * layer(n, v.width, v.mlp_dim)
        ctx_len += frames[m] * ctxc.tokens_per_frame
    parts["context"] = ctxc.fusion_layers * layer(ctx_len, v.width, v.mlp_dim)
    prefix = ctx_len if ctxc.prefix_tokens is None else min(ctx_len, ctxc.prefix_tokens)
    kv = t.num_kv_heads or t.num_heads
    d_kv = t.hidden_size * kv // t.num_heads

    def llama(n: int) -> float:
        d, f = t.hidden_size, t.intermediate_size
        per = 2 * n * (2 * d * d + 2 * d * d_kv + 3 * d * f) + 4 * n * n * d
        return t.num_layers * per

    o = cfg.objectives
    if o.contrastive_weight > 0 or o.matching_weight > 0:
        parts["llama/text"] = llama(text_len)
    if o.matching_weight > 0:
        parts["llama/matching"] = 3 * llama(prefix + text_len)
    if o.generation_weight > 0:
        parts["llama/generation"] = llama(prefix + text_len)
        parts["lm_head"] = 2 * o.mask_ratio * text_len * t.hidden_size * vocab_size
    return parts


def train_flops_per_sample(cfg: RunConfig, modalities: list[str], text_len: int, vocab_size: int) -> float:
    """Training FLOPs per sample: forward + backward = 3 x forward (:func:`flops_breakdown`).

    This is the model-FLOPs convention of MFU (PaLM, nanoGPT): activation recomputation is not counted,
    a run with checkpointing does 4 forward-equivalents of work for these 3.
    """
    return 3 * sum(flops_breakdown(cfg, modalities, text_len, vocab_size).values())
