"""Vision pretraining on PhantomVQA's exact findings: the tower learns to see before the model learns to answer.

Real VLMs start from a pretrained vision encoder (SmolVLM from SigLIP). The default
model is built from a config, so its tower starts random, and in the recipe's budget
next-token loss alone hardly reaches it: trained end to end, the model answered
side questions at chance (0.48) and said "yes" to absent findings.

This step trains the vision tower and the connector, and nothing else, on the
training split's labels (held-out images are only used to report the probes):
- per image, a linear probe on the image tokens: modality, and for each finding kind
  its presence, side, zone, size and count;
- per vision patch: which finding kinds cover it (`phantom.finding_masks`);
- per image token, in the text model's input space: which finding kinds lie in its
  region, and where the region is. Attention moves a token's content, not its
  position, so an answer about a side needs the side inside the token;
- the image tokens' mean over images is kept small against their spread, so that
  after the text model's RMSNorm what differs between images is most of the vector.
The probes are discarded; the model directory keeps the trained tower (see
`TrainConfig.freeze_vision` for keeping it fixed afterwards).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.phantom import COUNT_KINDS, FINDING_KINDS, REFERENCE_SIZE, SIDES, ZONES, Case, finding_masks, read_cases

_K = len(FINDING_KINDS)
_COUNTED = [FINDING_KINDS.index(k) for k in COUNT_KINDS]
_MAX_COUNT = 3


@dataclass(frozen=True)
class VisionPretrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 6e-3
    """Measured on 8,000 images at 600 steps: 6e-3 beat 5e-4, 2e-3 and 1.5e-2 on every held-out probe."""
    weight_decay: float = 0.01
    dense_weight: float = 1.0
    """Per-patch finding-kind loss. Measured from scratch at 600 steps: 5.0 raises the held-out
    max-patch AUROC (mass 0.836 -> 0.972, pneumothorax 0.775 -> 0.978, fracture 0.682 -> 0.948) and
    the side probe (0.942 -> 0.964), but a whole default build with it answered no better (positive
    accuracy 0.689 vs 0.668, inside run-to-run noise) and lost two targets (hallucination rate 0.124,
    p(hallucination) AUROC 0.886), so the recipe keeps 1.0."""
    token_weight: float = 1.0
    """Per-image-token loss: kinds in the token's region and the region's position."""
    center_weight: float = 1.0
    """Penalty on the image tokens' mean over the batch, relative to their energy."""
    presence_weight: float = 0.0
    """Per-image presence through the patch probe: each kind's most confident patch against whether
    the image has that kind (multiple-instance learning). The patch loss alone is dominated by the
    large findings' many patches; this asks the tower to find the one patch with a calcification."""
    pos_weight_max: float = 50.0
    """Cap on the patch loss's positive-class weight (the inverse odds of a patch showing the kind).
    On the default recipe's images every kind covers under 1.1% of the patches (calcifications and
    fractures 0.23%: odds 1 to ~430), so the cap binds for all of them."""
    image_probe: str = "flat"
    """How the per-image probe reads the image tokens. "flat": one linear map over all the tokens
    flattened (it can weigh each token position on its own). "attention": the way the text model
    reads them, one learned query per finding kind (and one for the image) attending over the
    RMS-normalised tokens, a linear read-out of what it pools; the tokens must then carry each
    kind's presence as a direction a query can find and its attributes in what it pools."""
    centre_weight: float = 0.0
    """Per vision patch, whether a nodule's or a calcification's centre lies in it, and per image the
    sum of those patch probabilities against the count (0 when absent): instances to count, where the
    patch loss only says which patches a kind covers."""
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.image_probe not in IMAGE_PROBES:
            raise ValueError(f"`image_probe` must be one of {IMAGE_PROBES}, got {self.image_probe!r}")


IMAGE_PROBES = ("flat", "attention")


def image_targets(case: Case) -> dict[str, np.ndarray]:
    """Per-image labels; -1 / NaN where a label does not apply (the kind is absent, or not counted)."""
    present, side, zone = np.zeros(_K, np.float32), np.full(_K, -1), np.full(_K, -1)
    size, count = np.full(_K, np.nan, np.float32), np.full(_K, -1)
    for f in case.findings:
        k = FINDING_KINDS.index(f.kind)
        present[k], side[k], zone[k] = 1.0, SIDES.index(f.side), ZONES.index(f.zone)
        size[k] = f.size_mm / 30.0
        if f.kind in COUNT_KINDS:
            count[k] = f.count - 1
    return {"modality": np.float32(case.modality == "axial CT"), "present": present, "side": side, "zone": zone,
            "size": size, "count": count}


def patch_targets(case: Case, image_size: int, grid: int) -> np.ndarray:
    """[grid * grid, K] float32: 1 where the finding kind's rendered pixels touch the patch."""
    out = np.zeros((grid * grid, _K), np.float32)
    for f, mask in zip(case.findings, finding_masks(case, image_size)):
        cell = mask.reshape(grid, image_size // grid, grid, image_size // grid).any((1, 3)).reshape(-1)
        out[cell, FINDING_KINDS.index(f.kind)] = 1.0
    return out


def centre_targets(case: Case, grid: int) -> np.ndarray:
    """[grid * grid, len(COUNT_KINDS)] float32: how many discs of each counted kind have their centre in the patch."""
    out = np.zeros((grid * grid, len(COUNT_KINDS)), np.float32)
    fov = case.pixel_spacing_mm * REFERENCE_SIZE
    for f in case.findings:
        if f.kind in COUNT_KINDS:
            for x, y in f.centers_mm:
                col, row = (min(max(int((v + fov / 2) / fov * grid), 0), grid - 1) for v in (x, y))
                out[row * grid + col, COUNT_KINDS.index(f.kind)] += 1
    return out


_KIND_LOGITS = (("present", 1), ("side", 1), ("zone", 3), ("size", 1), ("count", _MAX_COUNT))
"""Per finding kind, the image probe's logits for each label (`image_targets`)."""
_IMAGE_LAYOUT = (("modality", 1),) + tuple((name, n * _K) for name, n in _KIND_LOGITS)
"""The image probe's output, [B, _N_IMAGE]: these blocks in this order, each kind-major."""
_N_IMAGE = sum(n for _, n in _IMAGE_LAYOUT)


def _attention_reader(text_dim: int, key_dim: int = 32):
    """[B, T, D] image tokens -> [B, _N_IMAGE] logits, read by attention: one query per finding kind
    plus one for the whole image, each pooling the RMS-normalised tokens into its own read-out."""
    import torch

    class Reader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(text_dim)
            self.queries = torch.nn.Parameter(torch.randn(_K + 1, key_dim) * key_dim ** -0.5)
            self.key = torch.nn.Linear(text_dim, key_dim, bias=False)
            self.value = torch.nn.Linear(text_dim, text_dim, bias=False)
            per_kind = sum(n for _, n in _KIND_LOGITS)
            self.kind_out = torch.nn.Parameter(torch.randn(_K, text_dim, per_kind) * text_dim ** -0.5)
            self.kind_bias = torch.nn.Parameter(torch.zeros(_K, per_kind))
            self.image_out = torch.nn.Linear(text_dim, 1)

        def forward(self, feats):
            x = self.norm(feats)
            weights = torch.softmax(torch.einsum("qd,btd->bqt", self.queries, self.key(x)) * self.key.out_features ** -0.5, -1)
            pooled = torch.einsum("bqt,btd->bqd", weights, self.value(x))  # [B, K + 1, D]
            per_kind = torch.einsum("bkd,kdo->bko", pooled[:, :_K], self.kind_out) + self.kind_bias  # [B, K, 9]
            blocks = list(torch.split(per_kind, [n for _, n in _KIND_LOGITS], -1))  # each [B, K, n]
            return torch.cat([self.image_out(pooled[:, _K])] + [b.flatten(1) for b in blocks], -1)  # _IMAGE_LAYOUT

    return Reader()


class _Probes:
    """The discarded heads: image (flattened tokens, or read by attention), patch (vision width), token (text width)."""

    def __init__(self, n_tokens: int, text_dim: int, vision_dim: int, image_probe: str = "flat"):
        import torch

        if image_probe == "attention":
            self.image = _attention_reader(text_dim)
        else:
            self.image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(n_tokens * text_dim),
                                             torch.nn.Linear(n_tokens * text_dim, _N_IMAGE))
        self.patch = torch.nn.Linear(vision_dim, _K)
        self.token = torch.nn.Linear(text_dim, _K + 2)
        self.centre = torch.nn.Linear(vision_dim, len(COUNT_KINDS))

    def _modules(self):
        return self.image, self.patch, self.token, self.centre

    def parameters(self):
        return [p for m in self._modules() for p in m.parameters()]

    def train(self, on: bool) -> None:
        for m in self._modules():
            m.train(on)


def _split_image_logits(z):
    """[B, n_image] -> named logits."""
    parts = dict(zip((name for name, _ in _IMAGE_LAYOUT), z.split([n for _, n in _IMAGE_LAYOUT], -1)))
    parts["zone"] = parts["zone"].reshape(-1, _K, 3)
    parts["count"] = parts["count"].reshape(-1, _K, _MAX_COUNT)
    return parts


def _image_loss(z, t: dict):
    import torch
    import torch.nn.functional as F

    p = _split_image_logits(z)
    losses = {"modality": F.binary_cross_entropy_with_logits(p["modality"][:, 0], t["modality"]),
              "present": F.binary_cross_entropy_with_logits(p["present"], t["present"])}
    m = t["side"] >= 0
    if m.any():  # a finding's side and zone are known exactly when it is present
        losses["side"] = F.binary_cross_entropy_with_logits(p["side"][m], t["side"][m].float())
        losses["zone"] = F.cross_entropy(p["zone"].reshape(-1, 3), t["zone"].reshape(-1), ignore_index=-1)
    m = ~torch.isnan(t["size"])
    if m.any():
        losses["size"] = ((p["size"][m] - t["size"][m]) ** 2).mean()
    if (t["count"] >= 0).any():
        losses["count"] = F.cross_entropy(p["count"].reshape(-1, _MAX_COUNT), t["count"].reshape(-1), ignore_index=-1)
    return sum(losses.values())


def _centre_loss(z, t, pos_weight_max: float):
    """[B, P, C] per-patch centre logits against [B, P, C] centre counts: which patches hold a centre,
    and the image's count as the sum of the patches' probabilities."""
    import torch
    import torch.nn.functional as F

    hit = (t > 0).float()
    rate = hit.mean().clamp(min=1e-4)
    detect = F.binary_cross_entropy_with_logits(z, hit, pos_weight=torch.clamp((1 - rate) / rate, max=pos_weight_max))
    return detect + ((torch.sigmoid(z).sum(1) - t.sum(1)) ** 2).mean()


def pretrain_vision(model_dir: Path, phantom_dir: Path, cfg: VisionPretrainConfig = VisionPretrainConfig(),
                    log=print) -> dict:
    """Train `model_dir`'s vision tower and connector in place on `phantom_dir`'s training images.

    -> a record: the config, the final losses, seconds, and the probes' accuracy on held-out images.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from guard.backends.torch_backend import load_model
    from guard.preprocess import preprocess
    from guard.spec import spec_from_hf_dir

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    spec = spec_from_hf_dir(model_dir)
    model = load_model(model_dir)
    if model.config.model_type != "idefics3":
        raise ValueError(f"vision pretraining supports the SmolVLM (idefics3) family, not {model.config.model_type!r}")
    vision, connector = model.model.vision_model, model.model.connector
    size, patch = spec.preprocess.image_size, model.config.vision_config.patch_size
    grid = size // patch

    cases = read_cases(Path(phantom_dir) / "cases.json")
    images = Path(phantom_dir) / "images"

    def arrays(rows):
        pixels = np.stack([preprocess((images / name).read_bytes(), "image/png", spec.preprocess) for _, _, name in rows])
        per_image = [image_targets(c) for c, _, _ in rows]
        targets = {k: np.stack([t[k] for t in per_image]) for k in per_image[0]}
        return pixels, targets

    train_rows = [r for r in cases if r[1] == "train"]
    held_rows = [r for r in cases if r[1] != "train"]
    if not train_rows:
        raise ValueError(f"{phantom_dir}/cases.json has no training images")
    pixels, targets = arrays(train_rows)
    dense = np.stack([patch_targets(c, size, grid) for c, _, _ in train_rows])  # [N, P, K]
    centres = np.stack([centre_targets(c, grid) for c, _, _ in train_rows]) if cfg.centre_weight else None  # [N, P, C]

    # Where each image token's region is, and which patches it holds: the connector's own pixel shuffle.
    gy, gx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    xy = torch.tensor(np.stack([gx.ravel(), gy.ravel()], -1) / max(grid - 1, 1) * 2 - 1, dtype=torch.float32)[None]
    groups = connector.scale_factor ** 2

    def per_token(x):  # [B, P, C] -> [B, T, groups, C]
        return connector.pixel_shuffle(x, connector.scale_factor).reshape(x.shape[0], -1, groups, x.shape[-1])

    token_xy = per_token(xy).mean(2)  # [1, T, 2]: one row per image token
    probes = _Probes(token_xy.shape[1], model.config.text_config.hidden_size, model.config.vision_config.hidden_size,
                     cfg.image_probe)
    rate = dense.mean((0, 1))
    pos_weight = torch.tensor((1 - rate) / np.maximum(rate, 1e-4), dtype=torch.float32).clamp(max=cfg.pos_weight_max)

    params = list(vision.parameters()) + list(connector.parameters())
    opt = torch.optim.AdamW(params + probes.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    probes.train(True)
    ema: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), desc="vision pretraining", unit="step", disable=not cfg.show_progress)
    for _ in bar:
        idx = rng.integers(0, len(train_rows), cfg.batch_size)
        t = {k: torch.from_numpy(v[idx]) for k, v in targets.items()}
        h = vision(pixel_values=torch.from_numpy(pixels[idx])).last_hidden_state  # [B, P, Dv]
        feats = connector(h)  # [B, T, D]
        d = torch.from_numpy(dense[idx])
        image_loss = _image_loss(probes.image(feats), t)
        patch_logits = probes.patch(h)  # [B, P, K]
        patch_loss = F.binary_cross_entropy_with_logits(patch_logits, d, pos_weight=pos_weight)
        tok = probes.token(feats)
        token_loss = F.binary_cross_entropy_with_logits(tok[..., :_K], per_token(d).amax(2), pos_weight=pos_weight) \
            + ((tok[..., _K:] - token_xy) ** 2).mean()
        center = (feats.mean(0) ** 2).sum(-1).mean() / (feats ** 2).sum(-1).mean()
        parts = {"image": (1.0, image_loss), "patch": (cfg.dense_weight, patch_loss)}
        if cfg.presence_weight:
            parts["presence"] = (cfg.presence_weight,
                                 F.binary_cross_entropy_with_logits(patch_logits.amax(1), t["present"]))
        if cfg.centre_weight:
            parts["centre"] = (cfg.centre_weight, _centre_loss(probes.centre(h), torch.from_numpy(centres[idx]),
                                                                cfg.pos_weight_max))
        parts.update(token=(cfg.token_weight, token_loss), center=(cfg.center_weight, center))
        loss = sum(w * v for w, v in parts.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for name, (_, v) in parts.items():
            ema[name] = v.item() if name not in ema else 0.95 * ema[name] + 0.05 * v.item()
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
    bar.close()

    model.eval()
    probes.train(False)
    record = {"config": asdict(cfg), "train_images": len(train_rows), "final_loss_ema": {k: round(v, 4) for k, v in ema.items()}}
    if held_rows:
        record["heldout_probe"] = _probe_accuracy(model, probes, *arrays(held_rows), centres=bool(cfg.centre_weight))
    model.save_pretrained(model_dir)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"[vision] {cfg.steps} steps in {record['seconds']} s; held-out probe: {record.get('heldout_probe')}")
    return record


def _probe_accuracy(model, probes, pixels: np.ndarray, targets: dict, centres: bool = False) -> dict:
    """The probes on held-out images: the image probe's presence per kind, side, zone, count and size
    of present findings; with the centre probe, the count as the sum of its patch probabilities."""
    import torch

    from training.metrics import auroc

    with torch.no_grad():
        h = model.model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        z = probes.image(model.model.connector(h))
        patch_max = probes.patch(h).amax(1).numpy()  # [N, K]: the most confident patch per kind
        centre_sum = torch.sigmoid(probes.centre(h)).sum(1).numpy() if centres else None  # [N, len(COUNT_KINDS)]
    p = {k: v.numpy() for k, v in _split_image_logits(z).items()}
    present = targets["present"] > 0.5
    side_ok = (p["side"] > 0) == (targets["side"] == 1)
    counted = targets["count"] >= 0
    zone_ok = p["zone"].argmax(-1) == targets["zone"]
    return {
        "presence": {k: round(float(((p["present"][:, i] > 0) == present[:, i]).mean()), 3) for i, k in enumerate(FINDING_KINDS)},
        "presence_auroc_max_patch": {k: round(float(auroc(present[:, i], patch_max[:, i])), 3)
                                     for i, k in enumerate(FINDING_KINDS)},
        "presence_auroc_image_probe": {k: round(float(auroc(present[:, i], p["present"][:, i])), 3)
                                       for i, k in enumerate(FINDING_KINDS)},
        "presence_base_rate": {k: round(float(1 - present[:, i].mean()), 3) for i, k in enumerate(FINDING_KINDS)},
        "side": round(float(side_ok[present].mean()), 3) if present.any() else None,
        "zone": round(float(zone_ok[present].mean()), 3) if present.any() else None,
        "count": round(float((p["count"].argmax(-1) == targets["count"])[counted].mean()), 3) if counted.any() else None,
        **({"count_centre_sum": round(float((np.round(centre_sum) == targets["count"][:, _COUNTED] + 1)[counted[:, _COUNTED]].mean()), 3)}
           if centres and counted.any() else {}),
        "size_mae_mm": round(float(np.abs(p["size"] - targets["size"])[present].mean() * 30), 2) if present.any() else None,
        "images": int(len(pixels)),
    }
