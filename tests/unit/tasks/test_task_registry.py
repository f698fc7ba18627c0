"""Every task of mico_ds/tasks/ loads, names a metric the evaluation logs, and refuses configs it
cannot train, naming the keys."""

from __future__ import annotations

import pytest

from mico_ds import tasks
from mico_ds.config import load_config

RETRIEVAL = ["task.name=retrieval", "objectives.generation_weight=0", "eval.tasks=[retrieval]"]
CAPTIONING = [
    "task.name=captioning",
    "objectives.contrastive_weight=0",
    "objectives.matching_weight=0",
    "eval.tasks=[captioning]",
]


@pytest.mark.parametrize("name", tasks.names())
def test_every_task_loads_with_a_metric(name: str) -> None:
    task = tasks.get(name)
    assert task.name == name and task.summary
    assert task.metric.split("/")[0] in {"retrieval", "captioning", "qa", "classification"}


def test_retrieval_and_captioning_check_their_objectives() -> None:
    tasks.get("retrieval").check(load_config("debug", RETRIEVAL))
    tasks.get("captioning").check(load_config("debug", CAPTIONING))
    with pytest.raises(ValueError, match="generation_weight=0"):
        tasks.get("retrieval").check(load_config("debug", ["task.name=retrieval", "eval.tasks=[retrieval]"]))
    with pytest.raises(ValueError, match="add it to eval.tasks"):
        tasks.get("retrieval").check(load_config("debug", [*RETRIEVAL, "eval.tasks=[captioning]"]))
    with pytest.raises(ValueError, match="contrastive_weight=0"):
        tasks.get("captioning").check(
            load_config("debug", ["task.name=captioning", "eval.tasks=[captioning]"])
        )


def test_only_classification_trains_without_mico_objectives() -> None:
    zero = [
        "objectives.contrastive_weight=0",
        "objectives.matching_weight=0",
        "objectives.generation_weight=0",
    ]
    with pytest.raises(ValueError, match="at least one > 0"):
        load_config("debug", zero)
    cfg = load_config("debug", [*zero, "task.name=classification", "eval.tasks=[classification]"])
    assert cfg.objectives.weights(allow_none=True) == dict.fromkeys(cfg.objectives.weights(True), 0.0)
