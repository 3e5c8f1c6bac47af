"""Batched generation and guard features on a PyTorch model, for fitting the heads.

Serving computes features one request at a time through `guard.decode`; fitting
the heads needs them for thousands of answers. This module computes the same
features in batches, with the same split of the model (embed, splice image
features, text model, LM head) as `guard.backends.torch_backend`, and returns
`guard.types.Generation` objects, so `guard.head.answer_features` and
`prompt_features` apply unchanged (the question means included). A test checks
that both paths agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.decode import question_means, question_start, token_stats
from guard.families import family_for
from guard.types import Generation


@dataclass
class TorchModel:
    """A loaded HF model plus what the batched paths need to know about it."""

    model: object
    spec: object  # guard.spec.ModelSpec

    def __post_init__(self) -> None:
        self.family = family_for(self.model.config.model_type)
        self.text = self.family.text_model(self.model)


def _embeds(tm: TorchModel, ids, pixels):
    """ids [B, S] (with image slots), pixels [B, 3, H, W] -> inputs_embeds [B, S, D]."""
    return fill_image_slots(tm.model, ids, tm.family.image_features(tm.model, pixels), tm.spec.image_token_id)


def fill_image_slots(model, ids, feats, image_token_id: int):
    """Token embeddings of `ids` [B, S] with the image slots filled by `feats` [B, T_img, D], as the
    model's own forward fills them."""
    emb = model.get_input_embeddings()(ids).clone()
    emb[ids == image_token_id] = feats.reshape(-1, feats.shape[-1]).to(emb.dtype)
    return emb


def generate_batch(tm: TorchModel, prompts: list[list[int]], pixels: np.ndarray, max_new_tokens: int) -> list[list[int]]:
    """Greedy answers for a batch (left-padded, KV cache). Each list ends with EOS if one was produced."""
    import torch
    from transformers import DynamicCache

    eos = torch.tensor(tm.spec.eos_token_ids)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tm.spec.eos_token_ids[0], dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out_tokens = torch.zeros((len(prompts), 0), dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    with torch.inference_mode():
        embeds = _embeds(tm, ids, torch.from_numpy(pixels))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = tm.text(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                      cache=DynamicCache(config=tm.text.config), use_cache=True)
        for _ in range(max_new_tokens):
            tok = tm.model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            tok = torch.where(done, eos[0], tok)
            out_tokens = torch.cat([out_tokens, tok[:, None]], dim=1)
            done |= torch.isin(tok, eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            out = tm.text(inputs_embeds=tm.model.get_input_embeddings()(tok[:, None]), attention_mask=mask,
                          position_ids=pos, cache=out.cache, use_cache=True)
    return [_cut_at_eos(row.tolist(), tm.spec.eos_token_ids) for row in out_tokens]


def _cut_at_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def teacher_force_batch(tm: TorchModel, prompts: list[list[int]], answers: list[list[int]], pixels: np.ndarray) -> list[Generation]:
    """Features of given answers, batched (right-padded). Same rows as `guard.decode.teacher_force`."""
    import torch

    seqs = [p + a[:-1] for p, a in zip(prompts, answers)]  # the last answer token is predicted, never fed
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tm.spec.eos_token_ids[0], dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    with torch.inference_mode():
        out = tm.text(inputs_embeds=_embeds(tm, ids, torch.from_numpy(pixels)), attention_mask=mask,
                      output_hidden_states=True)
        last = out.last_hidden_state
        logits = tm.model.lm_head(last).float().numpy()
        mid = out.hidden_states[tm.spec.mid_layer].float().numpy()
        last = last.float().numpy()
    gens = []
    for row, (p, a) in enumerate(zip(prompts, answers)):
        rows = slice(len(p) - 1, len(p) - 1 + len(a))  # positions whose logits predict the answer tokens
        logprobs, entropies = token_stats(logits[row, rows], np.array(a))
        start = question_start(np.array(p), tm.spec.image_token_id)
        q_mid, q_last = question_means(mid[row, : len(p)], last[row, : len(p)], start)
        gens.append(Generation(
            token_ids=list(a),
            logprobs=logprobs,
            entropies=entropies,
            hidden_mid=mid[row, rows],
            hidden_last=last[row, rows],
            question_hidden_mid=q_mid,
            question_hidden_last=q_last,
            question_ids=np.asarray(p[start:], np.int64),
            stop_reason="teacher_forced",
        ))
    return gens
