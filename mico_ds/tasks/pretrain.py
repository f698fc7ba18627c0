"""``task.name: pretrain`` (the default): MiCo's contrastive, matching and generation objectives
(Eq. 4-6) on the captions the corpora give; the streams and the model as they always were."""

from mico_ds.tasks.base import Task

TASK = Task("pretrain", "MiCo pretraining: contrastive (Eq. 4), matching (Eq. 5), generation (Eq. 6)")
