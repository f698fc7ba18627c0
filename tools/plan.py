#!/usr/bin/env python
"""Memory and throughput planner for a recipe on N nodes x G GPUs: does it fit, how fast, how many days.

    python tools/plan.py vitg_llama2_7b_64gpu          # nodes, GPUs, GPU model from the recipe's launch hints
    python tools/plan.py vitg_llama2_7b_64gpu --nodes 4 --gpu h100-80gb --mfu 0.45
    python tools/plan.py vitl_llama2_7b_32gpu --train.ds_config=zero3_bf16_7b_offload.json --json
    python tools/plan.py vitg_llama2_7b_64gpu --model.vision.grad_checkpointing=false   # -> NO, exit 1
    python tools/plan.py debug --validate        # predicted vs measured peaks of real 2-rank CPU runs

Per GPU (all in bytes, Psi = parameters, Psi_t = trainable parameters, N = ranks; docs/planner.md):

* model states, ZeRO-3 with bf16 mixed precision: bf16 parameters 2 Psi/N, bf16 gradients 2 Psi_t/N,
  fp32 master weights 4 Psi_t/N, Adam moments 8 Psi_t/N (16 Psi/N in all, Rajbhandari et al. 2020),
  plus the fp32 copy of one optimizer sub-group's gradients made at the step (4 min(Psi_t/N,
  sub_group_size)) and the parameters below ``stage3_param_persistence_threshold``, held whole;
* ZeRO-3 buffers: gathered bf16 parameters, at most ``stage3_max_live_parameters`` + the largest module
  (prefetch, ``stage3_prefetch_bucket_size``, counts against the same limit), and the gradient
  reduce-scatter buckets, ``reduce_bucket_size`` x 2 bytes, twice with ``overlap_comm`` (plus a fp32
  copy with ``communication_data_type`` fp32);
* activations of each branch, with and without checkpointing: every tensor autograd saves, per layer
    ViT block      A s n (9 D + 2 F)        LN1 in/out, q k v, attention out, proj in, LN2 in/out, MLP
    Llama layer    s n ((8 + 9 A) H + 4 A I)   2 RMSNorms (fp32 inside), q/k/v, SDPA q k v out, o_proj,
                                            SwiGLU gate/up/act/product
  (A = 2 bytes in bf16; SDPA's memory-efficient kernels keep no s x s matrix; s tokens, n sequences).
  With checkpointing a layer keeps its input (A s n D) and backward recomputes one layer at a time
  (+2 layers' worth: the recomputed tensors and their gradients); without, all L layers (+1 layer of
  gradients). Plus the LM head on the masked tokens (m V (A + 8): bf16 logits, fp32 copy, log-softmax),
  the context fusion layers, the gathered matching prefixes (B P H A and their gradient), the batch;
* the contrastive loss over the global batch B for the configured kernel: naive b x B logits
  (2 directions x logits, log-softmax, gradient, fp32) vs tiled b x tile (torch) / on-chip (Triton),
  both with the gathered features (2 B E fp32) and their gradients.

FLOPs per sample come from ``mico_ds.train.metrics.flops_breakdown`` (formula written out there);
training = 3 x forward (a frozen first branch: 1 x, a frozen later branch: 2 x). Step time at a stated
MFU = per-rank FLOPs / (peak bf16 FLOP/s x MFU), against the ZeRO-3 traffic (all-gather of every
parameter for each forward and backward use, reduce-scatter of the gradients) over the per-GPU
network bandwidth: max of the two with ``overlap_comm``, their sum without. A corpus fits when
peak x 1.10 (allocator fragmentation) + 2 GiB (CUDA context, NCCL, cuBLAS workspaces) <= GPU memory.
Exit code 0: every corpus fits; 1: one does not (the table says NO); 2: usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

GiB = 2**30
CONTEXT_RESERVE = 2 * GiB  # CUDA context + NCCL + cuBLAS workspaces per GPU
FRAGMENTATION = 1.10  # caching-allocator headroom on top of the predicted peak


@dataclass(frozen=True)
class Gpu:
    name: str
    mem_gib: float
    bf16_tflops: float  # dense peak (no sparsity)
    net_gbs: float  # inter-node bandwidth per GPU, GB/s (one NIC per GPU)
    nvlink_gbs: float  # intra-node all-gather/reduce-scatter bus bandwidth per GPU, GB/s


GPUS: dict[str, Gpu] = {
    # A100 SXM4 80GB: 312 TFLOP/s bf16 dense; DGX A100: 8 x HDR 200 Gb/s = 25 GB/s per GPU
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", 80, 312.0, 25.0, 240.0),
    # H100 SXM5 80GB: 989 TFLOP/s bf16 dense; DGX H100: 8 x NDR 400 Gb/s = 50 GB/s per GPU
    "h100-80gb": Gpu("NVIDIA H100-SXM5-80GB", 80, 989.0, 50.0, 360.0),
    # H200 SXM 141GB (nvidia-smi: 140 GiB): H100's compute, more and faster memory
    "h200": Gpu("NVIDIA H200-SXM-141GB", 140, 989.0, 50.0, 360.0),
}


# ----------------------------------------------------------------------------- model facts


@dataclass
class ModelFacts:
    """Parameter counts of the built model (meta device: nothing is allocated)."""

    branches: dict[str, int]  # encoder, context, text, heads
    trainable: dict[str, int]
    largest_module: int  # parameters of the largest leaf module (gathered at once under ZeRO-3)
    persistent: int  # elements of parameters below stage3_param_persistence_threshold
    vocab: int

    @property
    def total(self) -> int:
        return sum(self.branches.values())

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())


def model_facts(cfg: Any, vocab: int, persistence_threshold: int) -> ModelFacts:
    import torch

    from mico_ds.data.schema import SpecialTokens
    from mico_ds.models.mico import MiCoModel

    special = SpecialTokens(vocab_size=vocab, pad_id=vocab - 2, bos_id=1, eos_id=2, mask_id=vocab - 1)
    saved = cfg.model.vision.pretrained, cfg.model.text.pretrained
    cfg.model.vision.pretrained = cfg.model.text.pretrained = None  # the recipe's sizes (checked at load)
    try:
        with torch.device("meta"):
            model = MiCoModel(cfg, special)
    finally:
        cfg.model.vision.pretrained, cfg.model.text.pretrained = saved
    scale = {"encoder": cfg.optim.vision_lr_scale, "text": cfg.optim.text_lr_scale}
    branches: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for name, child in model.named_children():
        key = name if name in ("encoder", "context", "text") else "heads"
        n = sum(p.numel() for p in child.parameters())
        branches[key] = branches.get(key, 0) + n
        trainable[key] = trainable.get(key, 0) + (0 if scale.get(name, 1.0) == 0 else n)
    leaves = [m for m in model.modules() if not list(m.children())]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in leaves)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < persistence_threshold)
    return ModelFacts(branches, trainable, largest, persistent, vocab)


def tokenizer_vocab(cfg: Any) -> int:
    """The tokenizer's vocabulary when its file exists; else Llama-2's 32000 + <pad> + <mask>."""
    path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if path is not None and path.is_file():
        from mico_ds.data.tokenizer import Tokenizer

        return Tokenizer.from_path(path).special.vocab_size
    return 32002


# ----------------------------------------------------------------------------- memory


@dataclass
class Geometry:
    """Token counts of one corpus's micro-batch."""

    b: int  # per-rank batch
    passes: dict[str, tuple[int, int]]  # modality -> (sequences through the ViT per sample, tokens each)
    ctx_len: int  # 1 + context tokens
    prefix: int
    text: int


def geometry(cfg: Any, modalities: list[str], b: int) -> Geometry:
    v, i, c = cfg.model.vision, cfg.inputs, cfg.model.context
    grid = (i.image_size // v.patch_size) ** 2 + 1
    agrid = (i.mel_bins // v.audio_patch_size) * (i.clip_frames // v.audio_patch_size) + 1
    frames = {"image": 1, "video": i.num_frames, "audio": i.num_clips, "depth": 1, "normal": 1}
    passes = {m: (frames[m], agrid if m == "audio" else grid) for m in modalities}
    ctx = 1 + sum(f * c.tokens_per_frame for f, _ in passes.values())
    prefix = ctx if c.prefix_tokens is None else min(ctx, c.prefix_tokens)
    return Geometry(b, passes, ctx, prefix, cfg.data.text_max_len)


def vit_layer_bytes(s: int, n: int, d: int, f: int, a: int) -> float:
    """Saved activations of one timm ViT block (pre-norm, SDPA): A s n (9 D + 2 F)."""
    return a * s * n * (9 * d + 2 * f)


def llama_layer_bytes(s: int, n: int, h: int, i: int, a: int) -> float:
    """Saved activations of one HF Llama decoder layer (SDPA, RMSNorm upcast to fp32)."""
    return s * n * ((8 + 9 * a) * h + 4 * a * i)


def branch_activations(cfg: Any, g: Geometry, a: int, vocab: int) -> dict[str, dict[str, float]]:
    """Per branch: saved bytes with and without checkpointing, and the backward working set."""
    v, t = cfg.model.vision, cfg.model.text
    out: dict[str, dict[str, float]] = {}
    saved_ck = saved_full = layer_max = 0.0
    extra = 0.0
    for frames, s in g.passes.values():
        n = g.b * frames
        layer = vit_layer_bytes(s, n, v.width, v.mlp_dim, a)
        saved_full += v.depth * layer
        saved_ck += v.depth * a * s * n * v.width
        layer_max = max(layer_max, layer)
        extra += 4 * a * s * n * v.width  # patch embedding, + position, final norm in/out
    out["vision"] = {"checkpointed": saved_ck + extra, "full": saved_full + extra, "layer": layer_max}
    h, i = t.hidden_size, t.intermediate_size
    o = cfg.objectives
    rows_prefixed = g.b * ((3 if o.matching_weight > 0 else 0) + (1 if o.generation_weight > 0 else 0))
    seqs = []
    if o.contrastive_weight > 0 or o.matching_weight > 0:
        seqs.append((g.text, g.b))  # text-only pass
    if rows_prefixed:
        seqs.append((g.prefix + g.text, rows_prefixed))
    saved_ck = saved_full = layer_max = extra = 0.0
    for s, n in seqs:
        layer = llama_layer_bytes(s, n, h, i, a)
        saved_full += t.num_layers * layer
        saved_ck += t.num_layers * a * s * n * h
        layer_max = max(layer_max, layer)
        extra += (4 + 3 * a) * s * n * h  # embeddings out, final RMSNorm, last hidden state
    if o.generation_weight > 0:
        masked = o.mask_ratio * g.b * g.text
        extra += masked * vocab * (a + 8)  # LM head logits, fp32 copy, log-softmax
    out["text"] = {"checkpointed": saved_ck + extra, "full": saved_full + extra, "layer": layer_max}
    fusion = cfg.model.context.fusion_layers * vit_layer_bytes(g.ctx_len, g.b, v.width, v.mlp_dim, a)
    out["context"] = {"checkpointed": fusion, "full": fusion, "layer": 0.0}  # fusion is never checkpointed
    return out


def contrastive_bytes(b: int, world: int, embed: int, kernel: str, tile: int) -> dict[str, float]:
    """Loss buffers over the global batch B = world x b (fp32)."""
    big_b = world * b
    feats = 2 * big_b * embed * 4 * 2  # gathered z and t, and their gradients
    naive = feats + 2 * 3 * b * big_b * 4  # 2 directions x (logits, log-softmax, gradient)
    tiled = feats + b * min(tile, big_b) * 4
    triton = feats
    chosen = {"naive": naive, "torch": tiled, "triton": triton}[kernel]
    return {"naive": naive, "tiled": tiled, "chosen": chosen}


@dataclass
class Memory:
    """Per-GPU bytes of one corpus's micro-batch; ``parts`` sums to ``peak``."""

    parts: dict[str, float]
    activations: dict[str, dict[str, float]]
    contrastive: dict[str, float]
    cpu_per_node: float
    peak: float = 0.0
    fits: bool = True
    need: float = 0.0  # peak x fragmentation + context reserve
    capacity: float = 0.0


def zero_settings(ds: dict[str, Any]) -> dict[str, Any]:
    z = ds.get("zero_optimization", {})
    return {
        "stage": int(z.get("stage", 0)),
        "reduce_bucket": float(z.get("reduce_bucket_size", 5e8)),
        "allgather_bucket": float(z.get("allgather_bucket_size", 5e8)),
        "prefetch": float(z.get("stage3_prefetch_bucket_size", 5e7)),
        "persistence": float(z.get("stage3_param_persistence_threshold", 1e5)),
        "max_live": float(z.get("stage3_max_live_parameters", 1e9)),
        "sub_group": float(z.get("sub_group_size", 1e9)),
        "overlap": bool(z.get("overlap_comm", z.get("stage", 0) == 3)),
        "offload_optimizer": (z.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        "offload_param": (z.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        "comm_fp32": ds.get("communication_data_type") == "fp32",
    }


def model_state_bytes(facts: ModelFacts, z: dict[str, Any], world: int, bf16: bool) -> dict[str, float]:
    """Parameters, gradients, master weights and Adam moments per GPU, by ZeRO stage."""
    psi, psi_t = facts.total, facts.total_trainable
    p = 2 if bf16 else 4
    stage = z["stage"]
    shard = world if stage == 3 else 1
    opt_shard = world if stage >= 1 else 1
    grad_shard = world if stage >= 2 else 1
    parts = {
        f"params ({p} Psi{'/N' if stage == 3 else ''})": 0.0 if z["offload_param"] else p * psi / shard,
        f"gradients ({p} Psi_t{'/N' if stage >= 2 else ''})": p * psi_t / grad_shard,
        "fp32 master weights (4 Psi_t/N)" if stage >= 1 else "fp32 master weights (4 Psi_t)": 0.0,
        "Adam moments (8 Psi_t/N)" if stage >= 1 else "Adam moments (8 Psi_t)": 0.0,
    }
    keys = list(parts)
    if not z["offload_optimizer"]:
        # DeepSpeed's ZeRO-1/2/3 keep a fp32 copy of the partition even for fp32 models; plain
        # torch (ZeRO-0, fp32) steps the parameters themselves.
        master = 4 * psi_t / opt_shard if (bf16 or stage >= 1) else 0.0
        parts[keys[2]] = master
        parts[keys[3]] = 8 * psi_t / opt_shard
        if stage >= 1 or bf16:  # fp32 gradients of one sub-group, made for the optimizer step
            parts["fp32 step gradients (4 min(Psi_t/N, sub_group))"] = 4 * min(
                psi_t / opt_shard, z["sub_group"]
            )
    if stage == 3:
        parts["persistent params (full, < threshold)"] = p * facts.persistent
    return parts


def buffer_bytes(facts: ModelFacts, z: dict[str, Any], bf16: bool) -> dict[str, float]:
    p = 2 if bf16 else 4
    copies = 2 if z["overlap"] else 1
    comm_extra = 4 if (z["comm_fp32"] and bf16) else 0
    if z["stage"] == 3:
        live = min(facts.total - facts.persistent, z["max_live"] + facts.largest_module)
        return {
            "gathered params (max_live + largest module)": p * live,
            f"reduce buckets ({copies} x reduce_bucket_size)": copies * (p + comm_extra) * z["reduce_bucket"],
        }
    bucket = min(z["reduce_bucket"], facts.total_trainable)
    out = {f"reduce buckets ({copies} x reduce_bucket_size)": copies * (p + comm_extra) * bucket}
    if z["stage"] >= 1:
        out["all-gather bucket"] = p * min(z["allgather_bucket"], facts.total)
    return out


def memory(
    cfg: Any,
    ds: dict[str, Any],
    facts: ModelFacts,
    world: int,
    gpus_per_node: int,
    corpus: Any,
    gpu: Gpu | None,
) -> Memory:
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    a = 2 if bf16 else 4
    z = zero_settings(ds)
    g = geometry(cfg, corpus.modalities, corpus.batch_size)
    parts = model_state_bytes(facts, z, world, bf16)
    parts.update(buffer_bytes(facts, z, bf16))
    acts = branch_activations(cfg, g, a, facts.vocab)
    ck = {"vision": cfg.model.vision.grad_checkpointing, "text": cfg.model.text.grad_checkpointing}
    work = []
    for name, act in acts.items():
        use_ck = ck.get(name, False)
        key = "checkpointed" if use_ck else "full"
        parts[f"activations: {name} ({'checkpointed' if use_ck else 'no checkpointing'})"] = act[key]
        work.append((2 if use_ck else 1) * act["layer"])
    parts["activations: backward working set (largest layer)"] = max(work)
    # matching re-encodes the gathered prefixes of the whole batch (all_gather_with_grad): + gradient
    if cfg.objectives.matching_weight > 0:
        parts["matching: gathered prefixes (2 B P H A)"] = (
            2 * world * g.b * g.prefix * cfg.model.text.hidden_size * a
        )
    pixels = sum(f * (1 if m in ("audio", "depth") else 3) for m, (f, _) in g.passes.items())
    side = cfg.inputs.image_size**2
    parts["input batch"] = g.b * a * pixels * side
    impl = cfg.model.kernels
    kernel = "triton" if impl in ("auto", "triton") and gpu is not None else "torch"
    if os.environ.get("MICO_PLAN_KERNEL"):
        kernel = os.environ["MICO_PLAN_KERNEL"]
    con = contrastive_bytes(g.b, world, cfg.model.embed_dim, kernel, cfg.objectives.contrastive_tile)
    parts[f"contrastive loss buffers ({kernel})"] = (
        con["chosen"] if cfg.objectives.contrastive_weight > 0 else 0
    )
    psi, psi_t = facts.total, facts.total_trainable
    cpu = 0.0
    if z["offload_optimizer"]:  # fp32 master + Adam + fp32 gradients of every rank of the node
        cpu += gpus_per_node * 16 * psi_t / world
    if z["offload_param"]:
        cpu += gpus_per_node * 2 * psi / world
    mem = Memory(parts, acts, con, cpu)
    mem.peak = sum(parts.values())
    if gpu is not None:
        mem.capacity = gpu.mem_gib * GiB
        mem.need = mem.peak * FRAGMENTATION + CONTEXT_RESERVE
        mem.fits = mem.need <= mem.capacity
    return mem


# ----------------------------------------------------------------------------- time


@dataclass
class Timing:
    flops_per_sample: float  # model FLOPs, training
    forward_parts: dict[str, float]
    compute_s: float
    comm_s: float
    step_s: float
    samples_per_s: float
    tflops_per_gpu: float


def timing(
    cfg: Any, ds: dict[str, Any], facts: ModelFacts, world: int, nodes: int, corpus: Any, gpu: Gpu, mfu: float
) -> Timing:
    from mico_ds.train.metrics import flops_breakdown

    parts = flops_breakdown(cfg, corpus.modalities, cfg.data.text_max_len, facts.vocab)
    o = cfg.optim
    factor = {k: 3.0 for k in parts}
    for k in parts:
        if k.startswith("vit/") and o.vision_lr_scale == 0:
            factor[k] = 1.0  # frozen and first: no backward at all
        if (k.startswith("llama/") or k == "lm_head") and o.text_lr_scale == 0:
            factor[k] = 2.0  # frozen, but the prefix path needs its input gradients
    flops = sum(factor[k] * v for k, v in parts.items())
    b = corpus.batch_size
    compute = b * flops / (gpu.bf16_tflops * 1e12 * mfu)
    z = zero_settings(ds)
    p = 2
    ring = (world - 1) / world
    bw = (gpu.net_gbs if nodes > 1 else gpu.nvlink_gbs) * 1e9
    uses_vision = len(corpus.modalities)  # the ViT runs once per modality (frames folded into its batch)
    uses_text = ("llama/text" in parts) + any(k in parts for k in ("llama/matching", "llama/generation"))
    br, bt = facts.branches, facts.trainable
    if z["stage"] == 3:
        gathered = 2 * (uses_vision * br["encoder"] + uses_text * br["text"] + br["context"] + br["heads"])
        reduced = facts.total_trainable
        volume = ring * (p * gathered + (4 if z["comm_fp32"] else p) * reduced)
    else:
        volume = 2 * ring * (4 if z["comm_fp32"] else p) * sum(bt.values())
    comm = volume / bw if world > 1 else 0.0
    step = max(compute, comm) if z["overlap"] else compute + comm
    return Timing(
        flops_per_sample=flops,
        forward_parts=parts,
        compute_s=compute,
        comm_s=comm,
        step_s=step,
        samples_per_s=b * world / step,
        tflops_per_gpu=b * flops / step / 1e12,
    )


# ----------------------------------------------------------------------------- the plan


@dataclass
class CorpusPlan:
    name: str
    modalities: list[str]
    batch_per_rank: int
    global_batch: int
    steps: int
    memory: Memory
    timing: Timing | None


@dataclass
class Plan:
    recipe: str
    nodes: int
    gpus_per_node: int
    world: int
    gpu: str
    mfu: float
    ds_config: str
    zero: dict[str, Any]
    params: dict[str, Any]
    corpora: list[CorpusPlan] = field(default_factory=list)
    days: float = 0.0
    fits: bool = True
    notes: list[str] = field(default_factory=list)


def make_plan(
    recipe: str,
    overrides: list[str],
    nodes: int | None,
    gpus_per_node: int | None,
    gpu_name: str | None,
    mfu: float,
    device: str = "gpu",
    batch: int | None = None,
) -> Plan:
    from mico_ds.config import load_config
    from mico_ds.data.mixture import step_counts
    from mico_ds.train.engine import resolve_ds_config

    cfg = load_config(recipe, overrides)
    set_batch(cfg, batch)
    hints = cfg.launch or {}
    nodes = nodes or int(hints.get("nodes", 1))
    gpn = gpus_per_node or int(hints.get("gpus_per_node", hints.get("nproc", 1)))
    world = nodes * gpn
    if device == "gpu":
        gpu_name = gpu_name or str(hints.get("gpu", "a100-80gb"))
        if gpu_name not in GPUS:
            raise ValueError(f"--gpu {gpu_name!r}: known GPUs {sorted(GPUS)}")
        gpu = GPUS[gpu_name]
        if cfg.train.precision == "auto":
            cfg.train.precision = "bf16"  # what auto resolves to on these GPUs
    else:
        gpu, gpu_name = None, "cpu"
    ds = resolve_ds_config(cfg, world)
    z = zero_settings(ds)
    facts = model_facts(cfg, tokenizer_vocab(cfg), int(z["persistence"]) if z["stage"] == 3 else 0)
    counts = step_counts(cfg.data.corpora, cfg.train.max_steps * cfg.optim.grad_accum)
    plan = Plan(
        recipe=cfg.name, nodes=nodes, gpus_per_node=gpn, world=world, gpu=gpu_name, mfu=mfu,
        ds_config=cfg.train.ds_config, zero=z,
        params={"total": facts.total, "trainable": facts.total_trainable, "branches": facts.branches,
                "largest_module": facts.largest_module, "persistent": facts.persistent, "vocab": facts.vocab},
    )  # fmt: skip
    seconds = 0.0
    for c, k in zip(cfg.data.corpora, counts):
        if k == 0:
            continue
        mem = memory(cfg, ds, facts, world, gpn, c, gpu)
        tim = timing(cfg, ds, facts, world, nodes, c, gpu, mfu) if gpu is not None else None
        if tim is not None:
            seconds += k * tim.step_s  # k micro-steps of this corpus
        plan.corpora.append(
            CorpusPlan(
                c.name,
                list(c.modalities),
                c.batch_size,
                c.batch_size * cfg.optim.grad_accum * world,
                k,
                mem,
                tim,
            )  # fmt: skip
        )
        plan.fits = plan.fits and mem.fits
    plan.days = seconds / 86400
    if z["offload_optimizer"] or z["offload_param"]:
        plan.notes.append(
            "offload: the CPU Adam step and the PCIe traffic of offloaded states are NOT in the step time"
        )
    paper = {c.name: c.global_batch for c in plan.corpora}
    hinted = int(hints.get("nodes", nodes)) * int(hints.get("gpus_per_node", gpn))
    if world != hinted:
        plan.notes.append(
            f"{world} ranks instead of the recipe's {hinted}: global batches scale with the world size "
            f"({paper}); set optim.grad_accum (or the per-rank batch sizes) to keep the recipe's"
        )
    return plan


# ----------------------------------------------------------------------------- output


def gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(plan: Plan) -> str:
    L = []
    gpu = GPUS.get(plan.gpu)
    L.append(
        f"== plan: {plan.recipe} on {plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu} = {plan.world} "
        f"ranks, {plan.ds_config} (ZeRO-{plan.zero['stage']}), MFU {plan.mfu:.0%} =="
    )
    pr = plan.params
    br = ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in pr["branches"].items())
    L.append(f"parameters: {pr['total'] / 1e9:.3f}B ({br}); trainable {pr['trainable'] / 1e9:.3f}B")
    worst = max(plan.corpora, key=lambda c: c.memory.peak)
    m = worst.memory
    L.append("")
    L.append(
        f"per-GPU memory, GiB (largest corpus micro-batch: {worst.name}, {worst.batch_per_rank} per rank)"
    )
    for k, v in m.parts.items():
        L.append(f"  {k:<58}{gib(v)}")
    L.append(f"  {'= predicted peak':<58}{gib(m.peak)}")
    if gpu is not None:
        L.append(f"  {'x 1.10 fragmentation + 2 GiB context':<58}{gib(m.need)}   of {gpu.mem_gib:.0f} GiB")
    if m.cpu_per_node:
        L.append(f"  CPU memory per node (offloaded states): {m.cpu_per_node / GiB:.1f} GiB")
    L.append("")
    L.append("activations by branch, GiB (checkpointed / not; the recipe's choice is used above)")
    for name, act in m.activations.items():
        L.append(f"  {name:<10} {gib(act['checkpointed'])} / {gib(act['full'])}")
    con = m.contrastive
    L.append(f"  contrastive: naive b x B logits {gib(con['naive'])}, tiled b x tile {gib(con['tiled'])}")
    if worst.timing is not None:
        t = worst.timing
        L.append("")
        L.append(f"forward FLOPs per sample ({worst.name}; training = 3 x forward: flops_breakdown):")
        for k, v in t.forward_parts.items():
            L.append(f"  {k:<20}{v / 1e12:10.3f} TFLOP")
        L.append(f"  {'training total':<20}{t.flops_per_sample / 1e12:10.3f} TFLOP")
    L.append("")
    hdr = f"{'corpus':<22}{'b/rank':>7}{'global':>8}{'steps':>9}{'peak GiB':>10}{'fits':>6}"
    if plan.corpora and plan.corpora[0].timing is not None:
        hdr += f"{'TFLOP/s':>9}{'compute s':>11}{'comm s':>8}{'step s':>8}{'samples/s':>11}"
    L.append(hdr)
    for c in plan.corpora:
        row = (f"{c.name:<22}{c.batch_per_rank:>7}{c.global_batch:>8}{c.steps:>9}{c.memory.peak / GiB:>10.1f}"
               f"{'yes' if c.memory.fits else 'NO':>6}")  # fmt: skip
        if c.timing is not None:
            t = c.timing
            row += (f"{t.tflops_per_gpu:>9.0f}{t.compute_s:>11.2f}{t.comm_s:>8.2f}{t.step_s:>8.2f}"
                    f"{t.samples_per_s:>11.0f}")  # fmt: skip
        L.append(row)
    if plan.corpora and plan.corpora[0].timing is not None:
        L.append(f"predicted time for the recipe's steps: {plan.days:.1f} days at {plan.mfu:.0%} MFU")
    L.extend(f"note: {n}" for n in plan.notes)
    L.append(f"fits: {'yes' if plan.fits else 'NO'}")
    return "\n".join(L)


def plan_json(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


# ----------------------------------------------------------------------------- validation (CPU)

VALIDATION_SIZE = [
    # debug geometry, widened so model states and activations stand well above allocator noise
    "inputs.image_size=64", "model.vision.width=256", "model.vision.depth=4", "model.vision.heads=4",
    "model.vision.mlp_dim=1024", "model.text.hidden_size=512", "model.text.num_layers=4",
    "model.text.num_heads=8", "model.text.intermediate_size=1408", "model.embed_dim=128",
    "train.precision=fp32",
]  # fmt: skip
VALIDATION_BATCH = 16


def set_batch(cfg: Any, batch: int | None) -> None:
    """Every corpus's per-rank batch (validation runs use one size for all)."""
    if batch is not None:
        for c in cfg.data.corpora:
            c.batch_size = batch


def measure_worker(args: argparse.Namespace, overrides: list[str]) -> None:
    """One rank of a validation run: RSS before the engine, after it, and the peak over a few steps."""
    import torch

    from mico_ds import distributed as mdist
    from mico_ds.config import load_config
    from mico_ds.data.pipeline import to_device
    from mico_ds.models.mico import MiCoModel
    from mico_ds.train import data as tdata
    from mico_ds.train.engine import build_engine, init_distributed
    from mico_ds.train.metrics import proc_status_bytes, reset_peak_rss

    cfg = load_config(args.recipe, overrides)
    set_batch(cfg, args.batch)
    init_distributed(cfg)
    torch.set_num_threads(1)
    tok = tdata.prepare_data(cfg)
    loader = tdata.build_train_data(cfg, tok)
    batches = [next(loader) for _ in range(args.steps)]
    loader.close()
    reset_peak_rss()  # what follows (engine, steps) is what is measured
    rss0 = proc_status_bytes("VmRSS")
    engine, _ = build_engine(cfg, lambda: MiCoModel(cfg, tok.special))
    rss_engine = proc_status_bytes("VmRSS")
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        batch = to_device(batch, engine.device, False)
        losses, _ = engine({**batch, "step": i})
        engine.backward(losses["loss"])
        engine.step()
        times.append(time.perf_counter() - t0)
    rss_end = proc_status_bytes("VmRSS")
    peak = proc_status_bytes("VmHWM")
    out = {"rank": mdist.get_rank(), "baseline": rss0, "after_engine": rss_engine - rss0,
           "after_steps": rss_end - rss0, "peak": peak - rss0, "step_s": times}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{mdist.get_rank()}.json").write_text(json.dumps(out))


def validate(
    recipe: str, overrides: list[str], steps: int, stages: list[int], batch: int | None
) -> dict[str, Any]:
    """Predicted vs measured per-rank peak of 2-rank CPU runs (fp32) for each ZeRO stage."""
    results: dict[str, Any] = {
        "recipe": recipe,
        "overrides": overrides,
        "batch": batch,
        "ranks": 2,
        "stages": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        base = [f"data.root={data}", f"data.tokenizer={data}/tokenizer/tokenizer.model", *overrides]
        for stage in stages:
            ov = [*base, f"train.ds_config=zero{stage}_cpu.json"]
            out = Path(tmp) / f"z{stage}"
            env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                       OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")  # fmt: skip
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                   "--master_port", str(29400 + os.getpid() % 500 + stage), "--no_local_rank",
                   str(Path(__file__).resolve()), recipe, "--measure-worker", "--out", str(out),
                   "--steps", str(steps), *(["--batch", str(batch)] if batch else []),
                   *[f"--{o}" for o in ov]]  # fmt: skip
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(
                    f"validation run ZeRO-{stage} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                )
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
            plan = make_plan(recipe, ov, 1, 2, None, 0.4, device="cpu", batch=batch)
            mem = plan.corpora[0].memory
            transient = ("activations", "input", "contrastive", "matching")
            states = sum(v for k, v in mem.parts.items() if not k.startswith(transient))
            results["stages"][str(stage)] = {
                "predicted_peak": mem.peak, "predicted_states_and_buffers": states,
                "measured_peak": max(r["peak"] for r in ranks),
                "measured_after_steps": max(r["after_steps"] for r in ranks),
                "step_s": [sum(r["step_s"][1:]) / max(1, len(r["step_s"]) - 1) for r in ranks],
                "parts": mem.parts, "params": plan.params,
            }  # fmt: skip
    return results


def format_validation(v: dict[str, Any]) -> str:
    L = [f"== planner validation: {v['recipe']} on 2 CPU ranks (fp32), {v['overrides']} =="]
    L.append(
        f"{'ZeRO':<6}{'pred. peak':>12}{'meas. peak':>12}{'ratio':>7}{'pred. states':>14}{'meas. after':>13}"
    )
    for st, r in v["stages"].items():
        mb = {k: v / 2**20 for k, v in r.items() if isinstance(v, (int, float))}
        L.append(
            f"{st:<6}{mb['predicted_peak']:>10.0f}MB{mb['measured_peak']:>10.0f}MB"
            f"{r['measured_peak'] / r['predicted_peak']:>7.2f}"
            f"{mb['predicted_states_and_buffers']:>12.0f}MB{mb['measured_after_steps']:>11.0f}MB"
        )
    return "\n".join(L)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("recipe")
    p.add_argument("--nodes", type=int, help="nodes [the recipe's launch.nodes, else 1]")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node [launch.gpus_per_node, else 1]")
    p.add_argument("--gpu", choices=sorted(GPUS), help="GPU model [launch.gpu, else a100-80gb]")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilization assumed [0.40]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--validate", action="store_true", help="predicted vs measured: 2-rank CPU runs, ZeRO 0/2/3"
    )
    p.add_argument("--steps", type=int, default=3, help="steps per validation run [3]")
    p.add_argument("--stages", default="0,2,3", help="ZeRO stages to validate [0,2,3]")
    p.add_argument("--no-size", action="store_true", help="validate at the recipe's own size (no widening)")
    p.add_argument("--batch", type=int, help="per-rank batch of every corpus [validation: 16]")
    p.add_argument("--measure-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    overrides = [a[2:] for a in rest]
    if args.measure_worker:
        measure_worker(args, overrides)
        return 0
    try:
        if args.validate:
            ov = ([] if args.no_size else VALIDATION_SIZE) + overrides
            batch = args.batch or (None if args.no_size else VALIDATION_BATCH)
            v = validate(args.recipe, ov, args.steps, [int(s) for s in args.stages.split(",")], batch)
            print(json.dumps(v, indent=1) if args.json else format_validation(v))
            return 0
        plan = make_plan(
            args.recipe, overrides, args.nodes, args.gpus_per_node, args.gpu, args.mfu, batch=args.batch
        )
    except ValueError as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
