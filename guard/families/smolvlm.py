"""SmolVLM / Idefics3: the edge family (SigLIP-style vision tower, pixel-shuffle connector, Llama text model).

We always run without image splitting: one global image of
`vision_config.image_size` pixels becomes
`(image_size / patch_size)**2 / scale_factor**2` image tokens.
"""

from __future__ import annotations

NAME = "smolvlm"
# The turn format of SmolVLM's chat template, written out so serving needs no Jinja.
PROMPT_TEMPLATE = "<|im_start|>User:{image}{question}<end_of_utterance>\nAssistant:"
# The same turn with the question before the image as well: the image tokens then see it.
QUESTION_FIRST_TEMPLATE = "<|im_start|>User:{question}\n{image}{question}<end_of_utterance>\nAssistant:"
ANSWER_PREFIX = " "
EOS_TOKENS = ("<end_of_utterance>",)
IMAGE_TOKEN = "<image>"


def num_image_tokens(config: dict) -> int:
    vision = config["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return patches // (config.get("scale_factor", 2) ** 2)


def image_text(config: dict) -> str:
    """The text that stands for one image in the prompt."""
    n = num_image_tokens(config)
    return "<fake_token_around_image><global-img>" + IMAGE_TOKEN * n + "<fake_token_around_image>"


# --- PyTorch side: called only by guard.backends.torch_backend -------------


def image_features(model, pixel_values):
    """pixel_values: [N, 3, H, W] -> [N, T_img, D_text]."""
    import torch

    out = model.model.get_image_features(pixel_values=pixel_values[:, None])  # [N, 1 image, 3, H, W]
    return torch.stack([f.reshape(-1, f.shape[-1]) for f in out.pooler_output])


def text_model(model):
    return model.model.text_model


def vision_tower(model):
    return model.model.vision_model


def connector(model):
    """The layers that map the tower's output into the text model's input space."""
    return model.model.connector


def pixel_kwargs(pixel_values) -> dict:
    """Model-forward keyword for a batch of single images [B, 3, H, W]."""
    return {"pixel_values": pixel_values[:, None]}  # Idefics3 takes [B, images per sample, 3, H, W]


LORA_TARGETS = r".*text_model\..*\.(q_proj|k_proj|v_proj|o_proj)"
"""peft target regex: the attention projections of the text model only, not the vision tower."""
