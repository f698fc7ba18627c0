"""The planner's memory and time model of one training step per GPU (docs/planner.md).

Per GPU (all in bytes, Psi = parameters, Psi_t = trainable parameters, N = ranks):
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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            model = MiCoModel.from_run_config(cfg, special)
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
