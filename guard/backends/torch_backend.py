"""PyTorch backend: the reference implementation over a Hugging Face model directory.

It splits a `*ForConditionalGeneration` model into the same three calls the
ONNX bundle has, so the decode loop, the guard and the parity tests treat
both alike. Training and export reuse it as the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from guard.backends import StepOutput
from guard.errors import ModelLoadError
from guard.families import family_for
from guard.spec import ModelSpec, dir_checksum, spec_from_hf_dir


class TorchBackend:
    def __init__(self, model, spec: ModelSpec, checksum: str, device: str = "cpu"):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.spec = spec
        self.checksum = checksum
        self.device = torch.device(device)
        self.name = f"torch:{self.device.type}"
        self._family = family_for(model.config.model_type)
        self._text = self._family.text_model(model)
        self._dtype = next(model.parameters()).dtype

    def _to_numpy(self, t) -> np.ndarray:
        return t.detach().to(self.torch.float32).cpu().numpy()

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            pv = self.torch.from_numpy(pixels).to(self.device, self._dtype)
            return self._to_numpy(self._family.image_features(self.model, pv))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            emb = self.model.get_input_embeddings()(self.torch.from_numpy(ids).to(self.device))
            return self._to_numpy(emb)

    def new_cache(self, batch: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._text.config)

    def forward(self, embeds, attention_mask, position_ids, cache) -> tuple[StepOutput, Any]:
        t = self.torch
        with t.inference_mode():
            out = self._text(
                inputs_embeds=t.from_numpy(embeds).to(self.device, self._dtype),
                attention_mask=t.from_numpy(attention_mask).to(self.device),
                position_ids=t.from_numpy(position_ids).to(self.device),
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            last = out.last_hidden_state  # [B, S, D], after the final norm
            logits = self.model.lm_head(last)
            step = StepOutput(
                logits=self._to_numpy(logits),
                hidden_mid=self._to_numpy(out.hidden_states[self.spec.mid_layer]),
                hidden_last=self._to_numpy(last),
            )
        return step, out.cache

    def merge_caches(self, caches: list[Any]) -> Any:
        from transformers import DynamicCache

        t = self.torch
        length = max(c.get_seq_length() for c in caches)
        pad = lambda x: t.nn.functional.pad(x, (0, 0, length - x.shape[2], 0))  # noqa: E731 [B,H,P,Dh], left
        layers = [
            (t.cat([pad(c.layers[i].keys) for c in caches]), t.cat([pad(c.layers[i].values) for c in caches]))
            for i in range(len(caches[0].layers))
        ]
        return DynamicCache(layers, config=self._text.config)

    def select_cache(self, cache: Any, rows: list[int], drop: int = 0) -> Any:
        from transformers import DynamicCache

        index = self.torch.tensor(rows, device=self.device)
        layers = [(layer.keys[index, :, drop:], layer.values[index, :, drop:]) for layer in cache.layers]
        return DynamicCache(layers, config=self._text.config)


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Load the Hugging Face model object (also used by training and export)."""
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load model weights from {model_dir}: {exc}") from exc


def load(path: str | Path, device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> TorchBackend:
    import torch

    if threads:
        torch.set_num_threads(threads)
    spec = spec_from_hf_dir(path)
    model = load_model(path, device, dtype)
    return TorchBackend(model, spec, dir_checksum(path), device)
