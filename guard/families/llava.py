"""LLaVA (and LLaVA-Med, which is LLaVA-based): CLIP vision tower, MLP projector, Llama/Mistral text model.

Image features come from `vision_feature_layer` of the vision tower; the
"default" strategy drops the CLS token, so a 336 px / 14 px-patch tower gives
576 image tokens.
"""

from __future__ import annotations

NAME = "llava"
# LLaVA-1.5's conversation format. LLaVA-Med v1.5 (Mistral) checkpoints can
# override it with `prompt_template` in medhallguard.json.
PROMPT_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"
QUESTION_FIRST_TEMPLATE = "USER: {question}\n{image}\n{question} ASSISTANT:"
ANSWER_PREFIX = " "
EOS_TOKENS = ("</s>",)
IMAGE_TOKEN = "<image>"


def num_image_tokens(config: dict) -> int:
    vision = config["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return patches + (1 if config.get("vision_feature_select_strategy", "default") == "full" else 0)


def image_text(config: dict) -> str:
    return IMAGE_TOKEN * num_image_tokens(config)


# --- PyTorch side: called only by guard.backends.torch_backend -------------


def image_features(model, pixel_values):
    """pixel_values: [N, 3, H, W] -> [N, T_img, D_text]."""
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    feats = out.pooler_output
    if isinstance(feats, (list, tuple)):
        import torch

        feats = torch.stack(list(feats))
    return feats


def text_model(model):
    return model.model.language_model


def vision_tower(model):
    return model.model.vision_tower


def connector(model):
    """The layers that map the tower's output into the text model's input space."""
    return model.model.multi_modal_projector


def pixel_kwargs(pixel_values) -> dict:
    """Model-forward keyword for a batch of single images [B, 3, H, W]."""
    return {"pixel_values": pixel_values}


LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"
"""peft target regex: the attention projections of the text model only, not the vision tower."""
