"""Weight formats of other projects, as adapters: a lazy reader of checkpoint files with conversion
plans (``reader``), timm / EVA ViTs (``timm``), Hugging Face Llama (``hf_llama``), the official MiCo
release's ``model_step_*.pt`` (``mico_release``, for ``--init``) and the safetensors / torch writers
(``safetensors``).

    export_branches(tensors, cfg, "out/branches", tokenizer)             # out/branches/{vision,text}

Outputs of :func:`export_branches`:

    vision/   timm: config.json (timm's Hugging Face format) + model.safetensors, a
              ``timm.models.vision_transformer.VisionTransformer`` state dict
              (``timm.create_model("local-dir:vision", pretrained=True)``), and
              omni_tokenizers.safetensors: the depth / normal / audio patch embeddings timm has no slot for
    text/     Hugging Face: config.json, generation_config.json, model*.safetensors, tokenizer files
              (``LlamaForCausalLM.from_pretrained("text")``, ``AutoTokenizer.from_pretrained("text")``)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mico_ds.checkpoint.formats.safetensors import TensorLike
from mico_ds.config import RunConfig


def export_branches(
    tensors: Mapping[str, TensorLike],
    cfg: RunConfig,
    out_dir: str | Path,
    tokenizer: Any,
    max_shard_size: int | None = None,
) -> dict[str, Path]:
    """Both branches: ``out_dir/vision`` (timm) and ``out_dir/text`` (Hugging Face)."""
    from mico_ds.checkpoint.formats.hf_llama import export_text
    from mico_ds.checkpoint.formats.timm import export_vision

    out = Path(out_dir)
    return {
        "vision": export_vision(tensors, cfg.model, cfg.inputs, out / "vision", max_shard_size),
        "text": export_text(tensors, cfg.model.text, out / "text", tokenizer, max_shard_size),
    }
