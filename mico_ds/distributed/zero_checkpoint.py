"""The DeepSpeed halves of checkpoints: loading an engine checkpoint (universal ones included, with
two DeepSpeed defects repaired), consolidating ZeRO partitions into fp32 weights, and converting to
DeepSpeed's universal format.

The mico_ds halves (layout, locator, commit order, client state) are ``mico_ds.checkpoint``; the file
writers are ``mico_ds.checkpoint.formats``. Used by ``tools/zero_to_fp32.py``, ``tools/to_universal.py``,
``python -m mico_ds.eval`` and the checkpoint manager.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mico_ds.checkpoint import manifest, safe_load
from mico_ds.checkpoint.layout import (
    CLIENT_DIR,
    META_FILE,
    MODEL_STATES,
    UNIVERSAL_MARKER,
    Location,
    describe,
    read_run_config,
)

log = logging.getLogger("mico_ds")


def load_engine_checkpoint(engine: Any, ckpt_dir: Path, tag: str, universal: bool = False) -> str | None:
    """``engine.load_checkpoint`` of one tag; ``universal=True`` loads a universal checkpoint.

    DeepSpeed takes "universal or not" from ``checkpoint.load_universal`` of its config, and reads it only
    inside ``load_checkpoint``; the engine is built before we know what the resume tag holds, so the
    parsed setting is switched on for this call (the same as having it in the JSON) and restored after.

    Two defects of DeepSpeed 0.19.8's ZeRO-3 universal load
    (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``) are repaired here: it gives EVERY
    param group the hyperparameters of group 0 (ours differ in weight_decay and lr_scale): the saved
    groups are put back; and it puts ONE ``step`` tensor into the Adam state of every sub-group, which
    torch's AdamW then increments in place once per sub-group per step (2 groups: the step count
    grows by 2 a step, skewing bias correction, and later checkpoints inherit the alias): each
    sub-group gets its own copy. ZeRO-1/2 restore each group from its own entries.

    Returns:
        The loaded path, or None when DeepSpeed found nothing to load.
    """
    conf = engine._config
    before = conf.load_universal_checkpoint
    conf.load_universal_checkpoint = universal
    # DeepSpeed unpickles with weights_only=False: its checkpoint engine is pointed at safe_load for
    # this call, and the files it reads with torch.load directly (universal ones) are checked first.
    safe_load.verify_tree(Path(ckpt_dir) / tag)
    ce = engine.checkpoint_engine
    ce.load = lambda path, map_location=None: safe_load.load(path, map_location=map_location)
    try:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    finally:
        conf.load_universal_checkpoint = before
        del ce.load  # the class's own method again
    if path is not None and universal and engine.zero_optimization_stage() == 3:
        saved = safe_load.load(Path(ckpt_dir) / tag / "zero" / "optimizer_state.pt")
        groups = saved["param_groups"]
        live = engine.optimizer.optimizer.param_groups  # the torch optimizer under ZeRO-3
        if len(groups) != len(live):
            raise ValueError(
                f"{ckpt_dir / tag}: {len(groups)} optimizer param groups saved, {len(live)} now "
                f"(optim.* or frozen branches changed?)"
            )
        for g, s in zip(live, groups):
            g.update({k: v for k, v in s.items() if k != "params"})
        for state in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    return path


class _UniversalTensor:
    """A parameter of a universal checkpoint, read from ``zero/<name>/fp32.pt`` on ``contiguous()``."""

    def __init__(self, path: Path, shape: torch.Size) -> None:
        self.path, self.shape, self.dtype = path, torch.Size(shape), torch.float32

    def contiguous(self) -> torch.Tensor:
        t = safe_load.load(self.path, map_location="cpu")
        t = t["param"] if isinstance(t, dict) else t
        return t.reshape(self.shape).float()


def _module_order(model_file: str) -> list[str]:
    sd = safe_load.load(model_file, map_location="cpu", mmap=True)
    return list(sd.get("module") or {})


def fp32_state_dict(ckpt_dir: str | Path, tag: str) -> Mapping[str, Any]:
    """The consolidated fp32 state dict of a checkpoint, as name -> tensor-like (``TensorLike`` of
    ``mico_ds.checkpoint.formats.safetensors``).

    ZeRO-3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)``; each value
    gathers its parameter from the (memory-mapped) partitions when ``contiguous()`` is called.
    ZeRO-1/2: the same call; DeepSpeed concatenates each parameter group's partitions up front, so
    the whole fp32 model is in memory. ZeRO-0: the module of ``mp_rank_00_model_states.pt``.
    Universal: ``zero/<name>/fp32.pt`` per parameter, read lazily. Keys follow the module's order.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    info = describe(tag_dir)
    model_files = sorted(glob.glob(str(tag_dir / MODEL_STATES)))
    order = _module_order(model_files[0])
    if info["universal"]:
        sd0 = safe_load.load(model_files[0], map_location="cpu", mmap=True)
        shapes = {k: v for group in sd0["param_shapes"] for k, v in group.items()}
        out: dict[str, Any] = {
            k: v.float() if v.is_floating_point() else v
            for k, v in sd0["module"].items()
            if k in sd0.get("buffer_names", [])
        }
        for name, shape in shapes.items():
            f = tag_dir / "zero" / name / "fp32.pt"
            if not f.is_file():
                raise ValueError(f"universal checkpoint {tag_dir} lacks {f}")
            out[name] = _UniversalTensor(f, shape)
    elif info["zero_stage"] == 0:
        sd0 = safe_load.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")
        out = {k: v.float() if v.is_floating_point() else v for k, v in sd0["module"].items()}
        opt = sd0.get("optimizer")
        if isinstance(opt, dict) and opt.get("fp32_groups"):
            # bf16 without ZeRO: the module holds bf16 copies, DeepSpeed's optimizer the fp32 masters
            out.update(_stage0_master_weights(ckpt_dir, tag, sd0["module"], opt["fp32_groups"]))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        safe_load.verify_tree(tag_dir)  # DeepSpeed unpickles these with weights_only=False
        out = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)
    rank = {k: i for i, k in enumerate(order)}
    return OrderedDict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _stage0_master_weights(
    ckpt_dir: Path, tag: str, module: Mapping[str, torch.Tensor], fp32_groups: list
) -> dict[str, torch.Tensor]:
    """Name the fp32 master copies of a ZeRO-0 bf16 optimizer (``fp32_groups``: one list of tensors per
    param group, no names) by rebuilding the trainer's param groups from the run config and the module's
    names and shapes (``mico_ds.optim.param_groups``: the rule that made them)."""
    from mico_ds.optim import param_groups

    fake = {
        name: torch.nn.Parameter(torch.empty(t.shape, device="meta"))
        for name, t in module.items()
        if t.is_floating_point()
    }

    class _Shapes(torch.nn.Module):
        def named_parameters(self, *a: Any, **k: Any):  # type: ignore[override]
            yield from fake.items()

    groups = param_groups(_Shapes(), read_run_config(Location("zero", Path(ckpt_dir), tag)).optim)
    if not all(isinstance(g, list) for g in fp32_groups) or len(groups) != len(fp32_groups):
        raise ValueError(
            f"{ckpt_dir / tag}: optimizer fp32_groups ({len(fp32_groups)} groups) do not match the run's "
            f"{len(groups)} parameter groups: cannot name the fp32 master weights"
        )
    names = {}
    by_id = {id(p): n for n, p in fake.items()}
    for gi, (g, masters) in enumerate(zip(groups, fp32_groups)):
        group_names = [by_id[id(p)] for p in g["params"]]
        shapes = [tuple(module[n].shape) for n in group_names]
        if shapes != [tuple(t.shape) for t in masters]:
            raise ValueError(f"{ckpt_dir / tag}: fp32_groups[{gi}] shapes do not match param group {gi}")
        names.update({n: t.float() for n, t in zip(group_names, masters)})
    return names


# ----------------------------------------------------------------------------- universal checkpoints


def to_universal(
    ckpt_dir: str | Path,
    tag: str,
    out_tag: str | None = None,
    *,
    workers: int = 1,
    overwrite: bool = False,
    keep_temp: bool = False,
    verify: bool = True,
) -> Path:
    """Convert ``ckpt_dir/tag`` (ZeRO-1/2/3) into a universal checkpoint ``ckpt_dir/out_tag``.

    DeepSpeed's ``ds_to_universal`` does the conversion (per-parameter fp32 weights and Adam moments,
    ``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``); this adds the mico_ds client state (``client/``:
    step, config, data positions) and the marker the trainer recognizes. The result is written under
    a temporary name and renamed when complete.

    Args:
        out_tag: default ``<tag>_universal``.
        workers: DeepSpeed's extract/merge processes (1: in this process).
        overwrite: replace an existing ``out_tag``.
        keep_temp: keep DeepSpeed's intermediate fragment files (``tmp/``) for debugging.
        verify: check the source against its manifest first (``ValueError`` naming a damaged file).
    """
    from deepspeed.checkpoint import ds_to_universal

    ckpt_dir = Path(ckpt_dir)
    src = ckpt_dir / tag
    out_tag = out_tag or f"{tag}_universal"
    out = ckpt_dir / out_tag
    if verify:
        log.info("%s", manifest.require_intact(src))
    info = describe(src)
    if info["universal"]:
        raise ValueError(f"{src} is already a universal checkpoint")
    safe_load.verify_tree(src)  # ds_to_universal unpickles these with weights_only=False
    if info["zero_stage"] == 0:
        raise ValueError(
            f"{src} is a ZeRO-0 checkpoint: mp_rank_00_model_states.pt holds the whole model and optimizer, "
            f"so it loads on any number of ranks as it is (resume with --allow-config-change); "
            f"DeepSpeed's universal format is for ZeRO-1/2/3"
        )
    if not (src / CLIENT_DIR / META_FILE).is_file():
        raise ValueError(f"{src / CLIENT_DIR / META_FILE} is missing: not a complete mico_ds checkpoint")
    if out.exists():
        if not overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it or --out-tag to name another")
        shutil.rmtree(out)
    tmp = ckpt_dir / f".{out_tag}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(tmp),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=keep_temp,
        strict=True,
        # ZeRO-1/2: DeepSpeed writes universal_checkpoint_info only for AutoTP/AutoEP models; its own
        # option supplies the plain (data-parallel only) version record the converter asks for.
        inject_missing_state=info["zero_stage"] <= 2,
    )
    t0 = time.perf_counter()
    ds_to_universal.main(args)
    shutil.copytree(src / CLIENT_DIR, tmp / CLIENT_DIR)
    marker = {
        "format": "deepspeed-universal",
        "source_tag": tag,
        "source_world_size": info["world_size"],
        "zero_stage": info["zero_stage"],
        "deepspeed_version": _ds_version(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (tmp / UNIVERSAL_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, out)
    # ds_to_universal pointed latest_universal at the temporary name; DeepSpeed reads it for tag=None
    ckpt_file = ckpt_dir / "latest_universal"
    ckpt_file.write_text(out_tag)
    return out


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__
