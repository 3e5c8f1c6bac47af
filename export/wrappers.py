"""torch.nn.Modules that cut a Hugging Face VLM into the three graphs of a bundle.

Each wrapper reproduces one call of `guard.backends.torch_backend.TorchBackend`
(the reference), written so that tracing gives a graph whose batch and
sequence dims stay dynamic:

- `VisionWrapper`:  pixel_values [N,3,H,W] -> image_features [N,T_img,D] (connector included)
- `EmbedWrapper`:   input_ids [B,S] -> inputs_embeds [B,S,D]
- `DecoderWrapper`: inputs_embeds, attention_mask [B,P+S], position_ids [B,S], 2L past tensors
                    -> logits, hidden_mid, hidden_last, 2L present tensors

The vision wrappers call the towers directly instead of `get_image_features`:
the latter splits its output per image with `.tolist()` sizes, which a trace
freezes to the example's batch. Idefics3's version also drops all-zero
(padding) images; an 8-bit image never normalizes to all zeros, so for real
images the result is the same computation (the parity tests check it).
"""

from __future__ import annotations

import torch
from torch import nn

from guard.families import family_for


class _SmolVLMVision(nn.Module):
    """The Idefics3 vision transformer + connector, for whole unpadded images of one fixed size.

    The position ids of such an image are constants; they are captured from an eager
    run of the model's own embedding code (the legacy exporter mistypes its
    bucketize/where arithmetic). With no padded patch, the model's bidirectional
    mask is skipped (None) in eager mode, and here too.
    """

    def __init__(self, model, image_size: int):
        super().__init__()
        vision = model.model.vision_model
        self.patch_embedding = vision.embeddings.patch_embedding
        self.position_embedding = vision.embeddings.position_embedding
        self.encoder = vision.encoder
        self.post_layernorm = vision.post_layernorm
        self.connector = model.model.connector
        self.register_buffer("position_ids", _captured_position_ids(vision, image_size), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, T_patch, D_vision]
        x = x + self.position_embedding(self.position_ids)
        hidden = self.post_layernorm(self.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state)
        return self.connector(hidden)  # [N, T_img, D]


def _captured_position_ids(vision, image_size: int) -> torch.Tensor:
    """[1, T_patch]: the ids the embedding module computes for a whole image of `image_size` px."""
    seen = []
    hook = vision.embeddings.position_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            p = vision.embeddings.patch_size
            px = torch.zeros(1, 3, image_size, image_size, dtype=vision.embeddings.patch_embedding.weight.dtype)
            vision.embeddings(px, torch.ones(1, image_size // p, image_size // p, dtype=torch.bool))
    finally:
        hook.remove()
    return seen[0].clone()


class _LlavaVision(nn.Module):
    def __init__(self, model, image_size: int):
        super().__init__()
        cfg = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        assert isinstance(self.layer, int), "multi-layer LLaVA vision features are not supported by the export"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states[self.layer]
        if self.strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        return self.projector(hidden)  # [N, T_img, D]


_VISION = {"smolvlm": _SmolVLMVision, "llava": _LlavaVision}


def VisionWrapper(model, image_size: int) -> nn.Module:  # noqa: N802 (a factory that reads like a class)
    return _VISION[family_for(model.config.model_type).NAME](model, image_size)


class EmbedWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderWrapper(nn.Module):
    """One decoder call over S new positions with a KV cache passed as flat tensors.

    past[2i], past[2i+1]: layer i's key and value, [B, H_kv, P, head_dim]; P may be 0.
    """

    def __init__(self, model, mid_layer: int):
        super().__init__()
        family = family_for(model.config.model_type)
        self.text = family.text_model(model)
        self.lm_head = model.lm_head
        self.mid_layer = mid_layer
        self.num_layers = self.text.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        assert len(past) == 2 * self.num_layers, "one key and one value per layer"
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], config=self.text.config)
        out = self.text(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        last = out.last_hidden_state  # [B, S, D], after the final norm
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(last), out.hidden_states[self.mid_layer], last, *presents)


def kv_shape(model) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the text model."""
    cfg = family_for(model.config.model_type).text_model(model).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim
