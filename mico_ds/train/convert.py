"""Reading mico_ds' DeepSpeed checkpoints outside a training job: consolidation and universal conversion.

The DeepSpeed-facing half of ``tools/zero_to_fp32.py`` and ``tools/to_universal.py`` (the file
writers are in ``mico_ds.export``, which does not import DeepSpeed):

* :func:`find_checkpoint` -- a run dir, its ``checkpoints/`` dir or a tag dir + ``--tag`` -> (dir, tag),
  with errors that list the tags there are;
* :func:`fp32_state_dict` -- the consolidated fp32 weights as a mapping of lazy tensors, by DeepSpeed's
  own ``deepspeed.utils.zero_to_fp32`` reader (ZeRO-1/2/3), the module file (ZeRO-0) or the per-parameter
  files of a universal checkpoint;
* :func:`to_universal` -- DeepSpeed's ``deepspeed.checkpoint.ds_to_universal`` plus the mico_ds
  client state and a marker (:data:`mico_ds.train.checkpoint.UNIVERSAL_MARKER`) the trainer reads to
  load it with ``checkpoint.load_universal``.
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

from mico_ds.train import checkpoint as ckpt

log = logging.getLogger("mico_ds")

MODEL_STATES = "*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"


def _is_tag_dir(p: Path) -> bool:
    return p.is_dir() and bool(glob.glob(str(p / MODEL_STATES)))


def available_tags(ckpt_dir: Path) -> list[str]:
    """Subdirectories of ``ckpt_dir`` that hold DeepSpeed model states (sorted)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if _is_tag_dir(p))


def find_checkpoint(path: str | Path, tag: str = "latest") -> tuple[Path, str]:
    """Resolve what an operator points at to ``(checkpoints dir, tag)``.

    Args:
        path: a run directory (holding ``checkpoints/``), a checkpoints directory (holding ``latest``
            and tag dirs) or a tag directory itself.
        tag: ``latest`` (the committed checkpoint) or a tag name, e.g. ``step00001000``.

    Raises:
        ValueError: the directory is missing, ``latest`` is missing, or the tag is unknown; the
            message lists the tags that exist.
    """
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: no such directory (give a run dir, its checkpoints/ dir or a checkpoint dir)")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    elif _is_tag_dir(p):
        if tag not in ("latest", p.name):
            raise ValueError(f"{p} is the checkpoint {p.name!r} itself; --tag {tag} names another one")
        return p.parent, p.name
    have = available_tags(p)
    if tag == "latest":
        t = ckpt.read_latest(p)
        if t is None:
            raise ValueError(
                f"{p / 'latest'} does not exist (no checkpoint was committed there); "
                f"pass --tag, one of: {have or 'none found'}"
            )
        tag = t
    if tag not in have:
        raise ValueError(f"no checkpoint {tag!r} in {p}; available tags: {have or 'none found'}")
    return p, tag


def describe(tag_dir: Path) -> dict[str, Any]:
    """``{"zero_stage", "world_size", "universal"}`` of a checkpoint directory, from its files."""
    tag_dir = Path(tag_dir)
    if ckpt.is_universal(tag_dir):
        info = json.loads((tag_dir / ckpt.UNIVERSAL_MARKER).read_text())
        return {"zero_stage": info["zero_stage"], "world_size": info["source_world_size"], "universal": True}
    optim = sorted(glob.glob(str(tag_dir / OPTIM_STATES)))
    if not optim:  # ZeRO-0: one file with the module and the (unpartitioned) optimizer
        return {"zero_stage": 0, "world_size": _meta_world(tag_dir), "universal": False}
    sd = torch.load(optim[0], map_location="cpu", mmap=True, weights_only=False)
    stage = sd.get("optimizer_state_dict", {}).get("zero_stage")
    if stage is None:
        raise ValueError(f"{optim[0]}: its optimizer state has no zero_stage: not a ZeRO checkpoint")
    return {"zero_stage": int(stage), "world_size": len(optim), "universal": False}


def _meta_world(tag_dir: Path) -> int | None:
    f = tag_dir / "client" / "meta.json"
    return json.loads(f.read_text()).get("world_size") if f.is_file() else None


class _UniversalTensor:
    """A parameter of a universal checkpoint, read from ``zero/<name>/fp32.pt`` on ``contiguous()``."""

    def __init__(self, path: Path, shape: torch.Size) -> None:
        self.path, self.shape, self.dtype = path, torch.Size(shape), torch.float32

    def contiguous(self) -> torch.Tensor:
        t = torch.load(self.path, map_location="cpu", weights_only=False)
        t = t["param"] if isinstance(t, dict) else t
        return t.reshape(self.shape).float()


def _module_order(model_file: str) -> list[str]:
    sd = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    return list(sd.get("module") or {})


def fp32_state_dict(ckpt_dir: str | Path, tag: str) -> Mapping[str, Any]:
    """The consolidated fp32 state dict of a checkpoint, as name -> tensor-like (see ``mico_ds.export``).

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
        sd0 = torch.load(model_files[0], map_location="cpu", mmap=True, weights_only=False)
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
        sd0 = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        out = {k: v.float() if v.is_floating_point() else v for k, v in sd0["module"].items()}
        opt = sd0.get("optimizer")
        if isinstance(opt, dict) and opt.get("fp32_groups"):
            # bf16 without ZeRO: the module holds bf16 copies, DeepSpeed's optimizer the fp32 masters
            out.update(_stage0_master_weights(ckpt_dir, tag, sd0["module"], opt["fp32_groups"]))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        out = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)
    rank = {k: i for i, k in enumerate(order)}
    return OrderedDict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _stage0_master_weights(
    ckpt_dir: Path, tag: str, module: Mapping[str, torch.Tensor], fp32_groups: list
) -> dict[str, torch.Tensor]:
    """Name the fp32 master copies of a ZeRO-0 bf16 optimizer (``fp32_groups``: one list of tensors per
    param group, no names) by rebuilding the trainer's param groups from the run config and the module's
    names and shapes (``mico_ds.train.engine.param_groups``: the rule that made them)."""
    from mico_ds.train.engine import param_groups

    fake = {
        name: torch.nn.Parameter(torch.empty(t.shape, device="meta"))
        for name, t in module.items()
        if t.is_floating_point()
    }

    class _Shapes(torch.nn.Module):
        def named_parameters(self, *a: Any, **k: Any):  # type: ignore[override]
            yield from fake.items()

    groups = param_groups(_Shapes(), load_run_config(ckpt_dir, tag))
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


def load_run_config(ckpt_dir: Path, tag: str):
    """The resolved RunConfig a checkpoint was written with (``client/meta.json``, else the run's
    ``config.yaml``)."""
    import yaml

    from mico_ds.config import config_from_dict

    meta = ckpt_dir / tag / "client" / "meta.json"
    if meta.is_file():
        return config_from_dict(json.loads(meta.read_text())["config"])
    cfg_file = ckpt_dir.parent / "config.yaml"
    if cfg_file.is_file():
        return config_from_dict(yaml.safe_load(cfg_file.read_text()))
    raise ValueError(f"neither {meta} nor {cfg_file} exists: cannot tell the model's configuration")


# ----------------------------------------------------------------------------- universal checkpoints


def to_universal(
    ckpt_dir: str | Path,
    tag: str,
    out_tag: str | None = None,
    *,
    workers: int = 1,
    overwrite: bool = False,
    keep_temp: bool = False,
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
    """
    from deepspeed.checkpoint import ds_to_universal

    ckpt_dir = Path(ckpt_dir)
    src = ckpt_dir / tag
    out_tag = out_tag or f"{tag}_universal"
    out = ckpt_dir / out_tag
    info = describe(src)
    if info["universal"]:
        raise ValueError(f"{src} is already a universal checkpoint")
    if info["zero_stage"] == 0:
        raise ValueError(
            f"{src} is a ZeRO-0 checkpoint: mp_rank_00_model_states.pt holds the whole model and optimizer, "
            f"so it loads on any number of ranks as it is (resume with --allow-config-change); "
            f"DeepSpeed's universal format is for ZeRO-1/2/3"
        )
    if not (src / "client" / "meta.json").is_file():
        raise ValueError(f"{src / 'client' / 'meta.json'} is missing: not a complete mico_ds checkpoint")
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
    shutil.copytree(src / "client", tmp / "client")
    marker = {
        "format": "deepspeed-universal",
        "source_tag": tag,
        "source_world_size": info["world_size"],
        "zero_stage": info["zero_stage"],
        "deepspeed_version": _ds_version(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (tmp / ckpt.UNIVERSAL_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, out)
    # ds_to_universal pointed latest_universal at the temporary name; DeepSpeed reads it for tag=None
    ckpt_file = ckpt_dir / "latest_universal"
    ckpt_file.write_text(out_tag)
    return out


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__
