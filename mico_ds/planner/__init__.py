"""The memory and throughput planner: does a recipe fit N nodes x G GPUs, how fast, how many days
(``python -m mico_ds.planner`` / ``tools/plan.py`` / ``mico-plan``; docs/planner.md)."""

from mico_ds.planner.cli import main
from mico_ds.planner.memory import GPUS, Memory, Timing
from mico_ds.planner.plan import CorpusPlan, Plan, format_plan, make_plan, plan_json
from mico_ds.planner.validate import VALIDATION_BATCH, VALIDATION_SIZE, format_validation, validate

__all__ = [
    "GPUS",
    "VALIDATION_BATCH",
    "VALIDATION_SIZE",
    "CorpusPlan",
    "Memory",
    "Plan",
    "Timing",
    "format_plan",
    "format_validation",
    "main",
    "make_plan",
    "plan_json",
    "validate",
]
