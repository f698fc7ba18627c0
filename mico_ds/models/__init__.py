"""The MiCo model: omni-encoder, multimodal context, Llama text branch, heads (DESIGN.md §5)."""

from mico_ds.models.context import MultimodalContext
from mico_ds.models.heads import LogitScale, MatchHead, PrefixProjector, ProjectionHead
from mico_ds.models.mico import LOSS_KEYS, MiCoModel, present_modalities
from mico_ds.models.omni_encoder import OmniEncoder, load_timm_checkpoint, timm_to_encoder_state_dict
from mico_ds.models.text_branch import TextBranch, TextOutput, llama_config, load_hf_llama

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
    "load_hf_llama",
    "load_timm_checkpoint",
    "present_modalities",
    "timm_to_encoder_state_dict",
]
