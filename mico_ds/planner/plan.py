"""A plan: does a recipe fit N nodes x G GPUs, how fast, how many days (``python -m mico_ds.planner``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mico_ds.planner.memory import (
    GPUS,
    GiB,
    Memory,
    Timing,
    memory,
    model_facts,
    timing,
    tokenizer_vocab,
    zero_settings,
)


def set_batch(cfg: Any, batch: int | None) -> None:
    """Every corpus's per-rank batch (validation runs use one size for all)."""
    if batch is not None:
        for c in cfg.data.corpora:
            c.batch_size = batch


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
    from mico_ds.data.read.mixture import step_counts
    from mico_ds.distributed.ds_config import resolve_ds_config

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
    scaled: dict[str, int] = {}  # global batches that follow the world size (per-rank batch_size given)
    for c, k in zip(cfg.data.corpora, counts):
        if k == 0:
            continue
        if c.global_batch_size is None:
            scaled[c.name] = c.batch_size * cfg.optim.grad_accum * world
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
    hinted = int(hints.get("nodes", nodes)) * int(hints.get("gpus_per_node", gpn))
    if world != hinted and scaled:
        plan.notes.append(
            f"{world} ranks instead of the recipe's {hinted}: the global batches of the corpora with a "
            f"per-rank batch_size scale with the world size ({scaled}); give them a global_batch_size "
            f"(or scale optim.grad_accum) to keep the recipe's"
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
