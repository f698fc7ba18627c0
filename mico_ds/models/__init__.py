"""The MiCo model: omni-encoder, multimodal context, Llama text branch, heads (docs/architecture.md,
"Model contract"). Weight formats of other projects load through ``mico_ds.checkpoint.formats``."""

from mico_ds.models.context import MultimodalContext
from mico_ds.models.heads import LogitScale, MatchHead, PrefixProjector, ProjectionHead
from mico_ds.models.mico import LOSS_KEYS, MiCoModel, present_modalities
from mico_ds.models.omni_encoder import OmniEncoder
from mico_ds.models.text_branch import TextBranch, TextOutput, llama_config

__all__ = [
    "LOSS_KEYS",
    "LogitScale",
    "MatchHead",
    "MiCoModel",
    "MultimodalContext",
    "OmniEncoder",
    "PrefixProjector",
    "ProjectionHead",
    "TextBranch",
    "TextOutput",
    "llama_config",
    "present_modalities",
]
