"""The Backend protocol and `load_backend`, which imports a backend only when asked.

A backend runs the three graphs of a split VLM (the same split the ONNX
export writes): vision encoder, token embedding, and a decoder step with a
KV cache, whose rows can be merged and selected so that sequences join and
leave a running batch. It exchanges numpy arrays with the rest of the runtime and knows
nothing of prompts, sampling, heads or policy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from guard.spec import ModelSpec


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, S, V] float32
    hidden_mid: np.ndarray  # [B, S, D] float32, hidden state after layer `spec.mid_layer`
    hidden_last: np.ndarray  # [B, S, D] float32, final normed hidden state (what the LM head reads)


class Backend(Protocol):
    spec: "ModelSpec"
    name: str
    """Backend and device/provider in use, e.g. "torch:cpu" or "onnxruntime:CPUExecutionProvider"."""
    checksum: str

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float32 -> image features [N, T_img, D] float32."""
        ...

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """[B, S] int64 -> [B, S, D] float32."""
        ...

    def new_cache(self, batch: int) -> Any:
        """An empty KV cache for `batch` sequences (opaque to callers)."""
        ...

    def forward(
        self, embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[StepOutput, Any]:
        """One decoder call over S new positions; embeds [B,S,D], attention_mask [B,past+S], position_ids [B,S]."""
        ...

    # Cache rows, for the batch scheduler (guard/batching.py): sequences join and leave a running batch.

    def merge_caches(self, caches: list[Any]) -> Any:
        """Stack caches along the batch, in order; a shorter past is left-padded with zeros to the longest.

        The caller masks the padded positions out (attention_mask 0) in later forward calls.
        """
        ...

    def select_cache(self, cache: Any, rows: list[int], drop: int = 0) -> Any:
        """Keep batch rows `rows` (in that order) and drop the first `drop` past positions of every row."""
        ...


def stack_left_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Host cache tensors [B_i, H, P_i, Dh] -> [sum B_i, H, max P_i, Dh], each left-padded with zeros.

    The layout merge_caches() promises, written into one buffer (no padded copy per cache).
    """
    length = max(a.shape[2] for a in arrays)
    _, h, _, d = arrays[0].shape
    out = np.zeros((sum(a.shape[0] for a in arrays), h, length, d), arrays[0].dtype)
    row = 0
    for a in arrays:
        out[row : row + a.shape[0], :, length - a.shape[2] :] = a
        row += a.shape[0]
    return out


_BACKENDS = {
    "torch": "guard.backends.torch_backend",  # a Hugging Face model directory
    "onnxruntime": "guard.backends.ort_backend",  # an export bundle (manifest.json)
    "tensorrt": "guard.backends.trt_backend",  # an export bundle with TensorRT engines
}


def load_backend(name: str, path: str | Path, **options: Any) -> Backend:
    """Import backend module `name` lazily and load the model at `path` with it."""
    if name not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {sorted(_BACKENDS)}, got {name!r}")
    return importlib.import_module(_BACKENDS[name]).load(path, **options)
