"""One small module per supported VLM family; this file only finds them.

A family module owns what differs between architectures: its prompt format,
how the image is spelled in tokens, and (for the PyTorch backend) where the
vision tower, text decoder and output layer live inside a Hugging Face model.
Modules are found by name, mlx-lm style, with no registry class.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from guard.errors import ModelLoadError

# Hugging Face `model_type` -> our family module.
_MODEL_TYPES = {"idefics3": "smolvlm", "smolvlm": "smolvlm", "llava": "llava"}


def family_for(model_type: str) -> ModuleType:
    name = _MODEL_TYPES.get(model_type)
    if name is None:
        raise ModelLoadError(
            f"model_type {model_type!r} in config.json is not a supported family; "
            f"supported: {sorted(_MODEL_TYPES)}"
        )
    return importlib.import_module(f"guard.families.{name}")
