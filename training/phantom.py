"""PhantomVQA: seeded medical-like images with exact findings, and questions with exact gold answers.

This module owns the synthetic cases (`Case`, `Finding`), their rendering (`render`), the
positive and hallucination-inducing question/answer pairs (`questions_for`) and the
LLaVA-style dataset files (`write_dataset`, `main`). Deciding whether a generated answer
is right or hallucinated belongs to `training.phantom_judge`, which reads the `QA.label`
written here; this module knows nothing of models or tokenizers.

Conventions (the judge and the tests rely on them):
- Sides are the PATIENT's. Both modalities use the radiological display convention: the
  patient's right is on the image's left (x < 0), the patient's left on the image's right.
- Geometry is in millimetres, origin at the image centre, x to the image right, y down.
  The field of view is fixed per case (`Case.pixel_spacing_mm` is mm per pixel at
  `REFERENCE_SIZE` px); `render(case, size)` scales it, see `pixel_spacing_mm(case, size)`.
- Zones: on a chest X-ray, the vertical thirds (upper/middle/lower) of the lung field that
  holds the finding's centre. An axial CT shows one slice; its `slice_level` (upper chest /
  mid chest with the heart / lung bases with liver and spleen) is the zone of every finding.
- `size_mm` is an integer: the diameter of a nodule, mass or calcification, the depth of an
  effusion's fluid, the rim width of a pneumothorax, and the length of the displaced rib
  segment of a fracture. Size questions are only asked for `SIZE_KINDS`; count questions
  only for `COUNT_KINDS` (all discs of one finding share its size, side and zone).
- Same seed -> byte-identical PNGs and identical questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

MODALITIES = ("chest X-ray", "axial CT")
SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")
REFERENCE_SIZE = 64
FIELD_OF_VIEW_MM = (330.0, 370.0)  # -> ~5.5 mm per pixel at 64 px

# Presets as plain data: size range (mm), count range, zones allowed on a chest X-ray.
FINDING_SPECS = {
    "nodule": dict(size_mm=(12, 30), count=(1, 3), zones=ZONES),
    "mass": dict(size_mm=(35, 60), count=(1, 1), zones=ZONES),
    "effusion": dict(size_mm=(20, 45), count=(1, 1), zones=("lower",)),
    "pneumothorax": dict(size_mm=(10, 30), count=(1, 1), zones=("upper",)),
    "fracture": dict(size_mm=(30, 45), count=(1, 1), zones=ZONES),
    "calcification": dict(size_mm=(5, 9), count=(1, 3), zones=ZONES),
}
FINDING_KINDS = tuple(FINDING_SPECS)
NOUNS = {"nodule": "nodule", "mass": "mass", "effusion": "pleural effusion", "pneumothorax": "pneumothorax",
         "fracture": "rib fracture", "calcification": "calcification"}
PLURALS = {"nodule": "nodules", "mass": "masses", "effusion": "pleural effusions", "pneumothorax": "pneumothoraces",
           "fracture": "rib fractures", "calcification": "calcifications"}
SIZE_KINDS = ("nodule", "mass", "effusion", "pneumothorax")
COUNT_KINDS = ("nodule", "calcification")
DISC_KINDS = ("nodule", "mass", "calcification")
CT_LEVEL_KINDS = {"upper": ("nodule", "mass", "pneumothorax", "fracture", "calcification"),
                  "middle": FINDING_KINDS, "lower": FINDING_KINDS}
N_FINDINGS_P = (0.3, 0.45, 0.25)  # P(0, 1, 2 findings)

POSITIVE_KINDS = ("presence", "side", "zone", "size", "count", "modality", "findings")
NEGATIVE_KINDS = ("absent_finding", "wrong_side", "wrong_size", "wrong_count", "wrong_modality",
                  "fake_annotation", "leading_claim")
WRONG_MODALITIES = {"chest X-ray": ("axial CT", "MRI", "ultrasound", "PET"),
                    "axial CT": ("chest X-ray", "MRI", "ultrasound", "PET")}
MODALITY_NAMES = {"chest X-ray": ("chest X-ray", "radiograph", "chest film"),
                  "axial CT": ("CT scan", "CT slice", "axial CT image"),
                  "MRI": ("MRI", "MRI scan", "MR image"), "ultrasound": ("ultrasound", "ultrasound image"),
                  "PET": ("PET scan", "PET image")}
ANNOTATIONS = ("arrow", "arrowhead", "red circle", "asterisk", "marker")
SIZE_TOLERANCE_MM = 5.0  # a stated size is right within max(5 mm, 25 % of the true size)
SIZE_TOLERANCE_FRAC = 0.25


@dataclass(frozen=True)
class Finding:
    """One abnormality; all its `count` discs share kind, side, zone and size."""

    kind: str
    """One of FINDING_KINDS."""
    side: str
    """The patient's side: "right" (image left) or "left" (image right)."""
    zone: str
    """"upper" | "middle" | "lower" (see the module docstring)."""
    size_mm: int
    """Diameter / fluid depth / rim width / segment length, by kind (module docstring)."""
    count: int = 1
    """How many discs (nodules, calcifications); 1 for the other kinds."""
    centers_mm: tuple[tuple[float, float], ...] = ()
    """(x, y) in mm from the image centre, one per disc; one representative point otherwise."""

    def __post_init__(self):
        spec = FINDING_SPECS.get(self.kind)
        if spec is None:
            raise ValueError(f"`kind` must be one of {FINDING_KINDS}, got {self.kind!r}")
        if self.side not in SIDES:
            raise ValueError(f"`side` must be one of {SIDES}, got {self.side!r}")
        if self.zone not in ZONES:
            raise ValueError(f"`zone` must be one of {ZONES}, got {self.zone!r}")
        if not isinstance(self.size_mm, int) or self.size_mm <= 0:
            raise ValueError(f"`size_mm` must be a positive int, got {self.size_mm!r}")
        if not spec["count"][0] <= self.count <= spec["count"][1]:
            raise ValueError(f"`count` must be in {spec['count']} for {self.kind}, got {self.count}")
        if self.centers_mm and len(self.centers_mm) != (self.count if self.kind in DISC_KINDS else 1):
            raise ValueError(f"`centers_mm` has {len(self.centers_mm)} points for count {self.count}")


@dataclass(frozen=True)
class Case:
    """One synthetic image: everything `render` needs, and the exact truth about it."""

    case_id: str
    modality: str
    """One of MODALITIES."""
    findings: tuple[Finding, ...]
    """0-2 findings of distinct kinds; empty for a normal case."""
    seed: int
    """Seeds the anatomy, per-finding shapes and the noise; same seed -> same pixels."""
    pixel_spacing_mm: float
    """mm per pixel at REFERENCE_SIZE px (the field of view is this * REFERENCE_SIZE)."""
    slice_level: str | None = None
    """Axial CT only: the slice's zone ("upper" | "middle" | "lower"); None for X-rays."""

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {MODALITIES}, got {self.modality!r}")
        kinds = [f.kind for f in self.findings]
        if len(kinds) > 2 or len(set(kinds)) != len(kinds):
            raise ValueError(f"`findings` must hold 0-2 distinct kinds, got {kinds}")
        if self.pixel_spacing_mm <= 0:
            raise ValueError("`pixel_spacing_mm` must be positive")
        if (self.modality == "axial CT") != (self.slice_level in ZONES):
            raise ValueError(f"`slice_level` must be a zone for axial CT and None otherwise, got {self.slice_level!r}")

    def finding(self, kind: str) -> Finding | None:
        return next((f for f in self.findings if f.kind == kind), None)


@dataclass(frozen=True)
class QA:
    """One question about one case with its gold answer and the facts to judge any answer."""

    question: str
    answer: str
    """The gold answer; yes/no answers start with "Yes" or "No"."""
    polarity: str
    """"positive" (asks about what is there) or "negative" (a false premise to correct)."""
    kind: str
    """One of POSITIVE_KINDS or NEGATIVE_KINDS."""
    label: dict = field(default_factory=dict)
    """JSON-able facts to judge any answer: `ask` (presence|side|zone|size|count|modality|findings|
    annotation), `finding` (kind asked about or None), `present`, `expected` ("yes"|"no"|None),
    `premise` (negative only: {"claim": present|side|size|count|modality|annotation|normal, ...the
    false value}), `modality`, `findings` (all of the case's), and side/zone/size_mm/count when
    the asked finding is present."""

    def __post_init__(self):
        kinds = POSITIVE_KINDS if self.polarity == "positive" else NEGATIVE_KINDS
        if self.polarity not in ("positive", "negative"):
            raise ValueError(f"`polarity` must be positive or negative, got {self.polarity!r}")
        if self.kind not in kinds:
            raise ValueError(f"`kind` {self.kind!r} is not a {self.polarity} kind")


def size_within_tolerance(stated_mm: float, true_mm: float) -> bool:
    """The judge's size rule; wrong-size premises are at least twice this tolerance away."""
    return abs(stated_mm - true_mm) <= max(SIZE_TOLERANCE_MM, SIZE_TOLERANCE_FRAC * true_mm)


def pixel_spacing_mm(case: Case, size: int) -> float:
    """mm per pixel of `render(case, size)`."""
    return case.pixel_spacing_mm * REFERENCE_SIZE / size


# ---- anatomy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    a: float  # x semi-axis, mm
    b: float  # y semi-axis, mm

    def rho2(self, x, y):
        return ((x - self.cx) / self.a) ** 2 + ((y - self.cy) / self.b) ** 2

    def inside(self, x, y):
        return self.rho2(x, y) <= 1.0


@dataclass(frozen=True)
class _Anatomy:
    body: _Ellipse
    lungs: dict  # side -> _Ellipse
    occluders: tuple  # ellipses drawn over the lungs (heart, mediastinum, aorta); no findings there
    parts: dict  # modality-specific ellipses and scalars for drawing


def _anatomy(modality: str, seed: int, level: str | None) -> _Anatomy:
    rng = np.random.default_rng([seed, 0])
    return _cxr_anatomy(rng) if modality == "chest X-ray" else _ct_anatomy(rng, level)


def _cxr_anatomy(rng) -> _Anatomy:
    off, a, b, cy = rng.uniform(64, 76), rng.uniform(50, 58), rng.uniform(100, 110), rng.uniform(-28, -16)
    lungs = {"right": _Ellipse(-off, cy, a * rng.uniform(0.96, 1.04), b),
             "left": _Ellipse(off, cy + rng.uniform(0, 6), a, b * rng.uniform(0.97, 1.03))}
    heart = _Ellipse(rng.uniform(12, 22), cy + b * 0.6, rng.uniform(52, 64), rng.uniform(40, 48))
    mediastinum = _Ellipse(rng.uniform(0, 6), cy - 40, rng.uniform(22, 28), 150)
    body = _Ellipse(0, 15, rng.uniform(138, 156), 190)
    return _Anatomy(body, lungs, (heart, mediastinum), dict(heart=heart, mediastinum=mediastinum))


def _ct_anatomy(rng, level: str) -> _Anatomy:
    body = _Ellipse(0, rng.uniform(0, 10), rng.uniform(138, 156), rng.uniform(98, 110))
    spine = _Ellipse(0, body.cy + body.b - 34, 15, 15)
    parts = dict(spine=spine, table_y=body.cy + body.b + rng.uniform(6, 12))
    if level == "upper":
        off, a, b, cy = rng.uniform(56, 62), rng.uniform(44, 50), rng.uniform(60, 68), body.cy - 6
        parts["trachea"] = _Ellipse(0, body.cy - 40, 9, 9)
    elif level == "middle":
        off, a, b, cy = rng.uniform(64, 70), rng.uniform(48, 54), rng.uniform(64, 72), body.cy
        parts["heart"] = _Ellipse(rng.uniform(8, 16), body.cy - 18, rng.uniform(46, 54), rng.uniform(38, 46))
        parts["aorta"] = _Ellipse(22, spine.cy - 14, 11, 11)
    else:
        off, a, b, cy = rng.uniform(66, 74), rng.uniform(36, 42), rng.uniform(34, 40), body.cy + 34
        parts["liver"] = _Ellipse(-35, body.cy - 6, 84, 66)
        parts["stomach"] = _Ellipse(52, body.cy - 26, 36, 26)
        parts["spleen"] = _Ellipse(86, body.cy + 26, 22, 30)
    lungs = {"right": _Ellipse(-off, cy, a, b), "left": _Ellipse(off, cy, a * rng.uniform(0.95, 1.05), b)}
    occluders = tuple(parts[k] for k in ("heart", "aorta", "trachea") if k in parts) + (spine,)
    return _Anatomy(body, lungs, occluders, parts)


# ---- sampling ----------------------------------------------------------------------------------


def _zone_band(lung: _Ellipse, zone: str) -> tuple[float, float]:
    """The y range (mm) of one third of a lung field, trimmed so centres sit clearly inside it."""
    h = 2 * lung.b / 3
    top = lung.cy - lung.b + ZONES.index(zone) * h
    return top + 0.12 * h, top + 0.88 * h


def _disc_fits(anat: _Anatomy, lung: _Ellipse, x: float, y: float, r: float) -> bool:
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    px, py = np.append(x + r * np.cos(t), x), np.append(y + r * np.sin(t), y)
    return bool(lung.inside(px, py).all()) and not any(o.inside(px, py).any() for o in anat.occluders)


def _place_discs(rng, anat, lung, band, n, r, taken) -> list | None:
    """n non-overlapping disc centres of radius r inside `lung` with y in `band`; None if no room."""
    out = []
    for _ in range(300):
        x = rng.uniform(lung.cx - lung.a, lung.cx + lung.a)
        y = rng.uniform(*band)
        clear = all(np.hypot(x - tx, y - ty) > r + tr + 6 for tx, ty, tr in taken + [(px, py, r) for px, py in out])
        if clear and _disc_fits(anat, lung, x, y, r):
            out.append((round(float(x), 2), round(float(y), 2)))
            if len(out) == n:
                return out
    return None


def _lateral_point(lung: _Ellipse, side: str, y: float) -> tuple[float, float]:
    """A point just inside the lateral edge of the lung at height y (where the ribs are visible)."""
    lateral = -1.0 if side == "right" else 1.0
    half = lung.a * np.sqrt(max(0.0, 1 - ((y - lung.cy) / lung.b) ** 2))
    return round(float(lung.cx + lateral * 0.8 * half), 2), round(float(y), 2)


def _sample_finding(rng, case_level, anat, kind, side, taken) -> Finding | None:
    spec = FINDING_SPECS[kind]
    zone = case_level or str(rng.choice(spec["zones"]))
    size = int(rng.integers(spec["size_mm"][0], spec["size_mm"][1] + 1))
    count = int(rng.integers(spec["count"][0], spec["count"][1] + 1))
    lung = anat.lungs[side]
    band = (lung.cy - lung.b, lung.cy + lung.b) if case_level else _zone_band(lung, zone)
    if kind in DISC_KINDS:
        centers = _place_discs(rng, anat, lung, band, count, size / 2, taken)
    elif kind == "fracture":
        centers = [_lateral_point(lung, side, rng.uniform(*band))]
        if case_level:  # CT: the representative point is on the rib outside the lung
            centers = [_ct_rib_point(anat, side, rng.uniform(-0.5, 0.5))]
        (fx, fy), reach = centers[0], size / 2 + 6
        if any(np.hypot(fx - tx, fy - ty) < reach + tr for tx, ty, tr in taken):
            return None
    else:  # effusion: lung base, pneumothorax: lung apex / anterior edge
        y = lung.cy + (lung.b - size / 2 if kind == "effusion" else -lung.b + size / 2)
        centers = [(round(float(lung.cx), 2), round(float(y), 2))]
    if centers is None:
        return None
    return Finding(kind, side, zone, size, count, tuple(centers))


def _ct_rib_point(anat: _Anatomy, side: str, t: float) -> tuple[float, float]:
    """A point on the ribs along the lateral chest wall; t in [-0.5, 0.5] runs anterior -> posterior."""
    theta = (np.pi + t) if side == "right" else -t
    b = anat.body
    return round(float(b.cx + (b.a - 12) * np.cos(theta)), 2), round(float(b.cy + (b.b - 12) * np.sin(theta)), 2)


def _compatible(f: Finding, others: list[Finding]) -> bool:
    """Region findings (effusion, pneumothorax) take their whole side: they would cover another finding."""
    regions = ("effusion", "pneumothorax")
    return not any(f.side == o.side and (f.kind in regions or o.kind in regions) for o in others)


def sample_case(rng: np.random.Generator, case_id: str = "case") -> Case:
    """Draw one case: modality, field of view, slice level, 0-2 findings placed in the anatomy."""
    modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    seed = int(rng.integers(2**31 - 1))
    spacing = round(float(rng.uniform(*FIELD_OF_VIEW_MM)) / REFERENCE_SIZE, 4)
    level = str(rng.choice(ZONES)) if modality == "axial CT" else None
    anat = _anatomy(modality, seed, level)
    allowed = CT_LEVEL_KINDS[level] if level else FINDING_KINDS
    n = int(rng.choice(3, p=N_FINDINGS_P))
    findings: list[Finding] = []
    for kind in rng.permutation(allowed)[:n]:
        for _ in range(5):  # a few retries with fresh side/size/zone when there is no room
            taken = [(x, y, o.size_mm / 2 + (0 if o.kind in DISC_KINDS else 6))  # (x, y, keep-out radius)
                     for o in findings for x, y in o.centers_mm]
            f = _sample_finding(rng, level, anat, str(kind), SIDES[int(rng.integers(2))], taken)
            if f is not None and _compatible(f, findings):
                findings.append(f)
                break
    return Case(case_id, modality, tuple(findings), seed, spacing, level)


def generate(n_images: int, seed: int) -> list[Case]:
    """n_images cases, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return [sample_case(rng, f"phantom_{seed}_{i:06d}") for i in range(n_images)]


# ---- rendering ---------------------------------------------------------------------------------


def _grid(case: Case, n: int):
    """Pixel-centre coordinates in mm: x, y each [n, n] (x to the image right, y down)."""
    fov = case.pixel_spacing_mm * REFERENCE_SIZE
    c = ((np.arange(n, dtype=np.float32) + 0.5) * (fov / n) - fov / 2).astype(np.float32)
    return np.meshgrid(c, c)  # x varies along columns


def _band(x, y, x0, y0, x1, y1, half_width):
    """Mask of a straight band of half_width mm from (x0, y0) to (x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)) <= half_width


def _draw_cxr(anat: _Anatomy, x, y):
    img = np.full(x.shape, 0.03, np.float32)
    body = (np.abs(x / anat.body.a) ** 4 + np.abs((y - anat.body.cy) / anat.body.b) ** 4) <= 1
    img[body] = 0.5 + 0.08 * np.clip(y[body] / 150, 0, 1)
    img[body & (np.abs(x) < 14)] += 0.06  # spine, seen through everything
    for side, lung in anat.lungs.items():
        inside = lung.inside(x, y)
        hilum = np.exp(-((x - lung.cx * 0.55) ** 2 + (y - lung.cy) ** 2) / (2 * 28.0**2))
        img[inside] = 0.22 + 0.1 * hilum[inside]
        medial = 12.0 if side == "left" else -12.0
        for k in range(9):  # posterior ribs: faint arcs descending laterally
            yk = lung.cy - lung.b + 10 + 24 * k + 0.004 * (x - medial) ** 2
            img[inside & (np.abs(y - yk) < 4)] += 0.07
    for ell, value in ((anat.parts["mediastinum"], 0.62), (anat.parts["heart"], 0.68)):
        img[ell.inside(x, y)] = value
    for s in (-1, 1):  # clavicles
        top = anat.lungs["left" if s > 0 else "right"].cy - anat.lungs["right"].b
        img[_band(x, y, 15 * s, top - 4, 130 * s, top - 26, 4.5)] += 0.12
    return img


def _draw_ct(anat: _Anatomy, x, y):
    p, body = anat.parts, anat.body
    img = np.zeros(x.shape, np.float32)
    img[np.abs(y - p["table_y"]) < 2.5] = 0.55  # table line
    img[body.inside(x, y)] = 0.38  # subcutaneous fat ring
    img[_Ellipse(body.cx, body.cy, body.a - 10, body.b - 10).inside(x, y)] = 0.5
    for name, value in (("liver", 0.6), ("stomach", 0.3), ("spleen", 0.56)):
        if name in p:
            img[p[name].inside(x, y)] = value
    for lung in anat.lungs.values():
        img[lung.inside(x, y)] = 0.16
    for name, value in (("heart", 0.56), ("aorta", 0.62), ("trachea", 0.02)):
        if name in p:
            img[p[name].inside(x, y)] = value
    spine = p["spine"]
    img[spine.inside(x, y)] = 0.85
    img[_Ellipse(spine.cx, spine.cy + 24, 7, 6).inside(x, y)] = 0.2  # spinal canal
    img[_band(x, y, -16, spine.cy + 34, 16, spine.cy + 34, 4)] = 0.8  # posterior arch
    for side in SIDES:
        for t in np.linspace(-1.3, 1.3, 7):  # ribs in cross-section along the chest wall
            rx, ry = _ct_rib_point(anat, side, t)
            img[_Ellipse(rx, ry, 5, 4).inside(x, y)] = 0.82
    return img


def _finding_layers(case: Case, anat: _Anatomy, f: Finding, index: int, x, y, px_mm: float):
    """[(alpha [n, n] in 0..1, value)] blended over the anatomy in order; alpha is 0 off the finding."""
    rng = np.random.default_rng([case.seed, 7, index])  # shape details, independent of the noise
    lung, ct = anat.lungs[f.side], case.modality == "axial CT"
    if f.kind in DISC_KINDS:
        r = max(f.size_mm / 2, 0.9 * px_mm)  # ~2 px across at least: stays visible at 64 px
        alpha = np.zeros(x.shape, np.float32)
        for cx, cy in f.centers_mm:
            lobes = 0.12 * np.sin(3 * np.arctan2(y - cy, x - cx) + rng.uniform(0, 6.3))  # masses are lobulated
            wobble = 1 + (lobes if f.kind == "mass" else 0)
            alpha = np.maximum(alpha, np.hypot(x - cx, y - cy) <= r * wobble)
        return [(alpha, {"nodule": 0.64, "mass": 0.68, "calcification": 0.98}[f.kind])]
    if f.kind == "effusion":
        return [(_effusion_alpha(lung, f.size_mm, ct, x, y), 0.45 if ct else 0.64)]
    if f.kind == "pneumothorax":
        return _pneumothorax_layers(lung, f, ct, x, y)
    return [(_fracture_alpha(anat, f, ct, rng, x, y), 0.92)]


def _effusion_alpha(lung: _Ellipse, depth: float, ct: bool, x, y):
    inside = lung.inside(x, y)
    if ct:  # supine: fluid lies posteriorly (image bottom) in a crescent `depth` mm thick
        inner = _Ellipse(lung.cx, lung.cy - depth / 2, lung.a, lung.b - depth / 2)
        return (inside & ~inner.inside(x, y) & (y > lung.cy)).astype(np.float32)
    lateral = np.abs(x - lung.cx)
    level = lung.cy + lung.b - depth - 0.3 * lateral  # meniscus rising laterally
    return (inside * np.clip((y - level) / 8, 0, 1)).astype(np.float32)


def _pneumothorax_layers(lung: _Ellipse, f: Finding, ct: bool, x, y):
    rim = float(f.size_mm)
    if ct:  # supine: air collects anteriorly (image top)
        inner = _Ellipse(lung.cx, lung.cy + rim / 2, lung.a - 0.3 * rim, lung.b - rim / 2)
    else:  # erect: apical and lateral rim; the collapsed lung keeps its medial edge
        medial = 1.0 if f.side == "right" else -1.0
        inner = _Ellipse(lung.cx + medial * rim / 2, lung.cy + rim / 2, lung.a - rim / 2, lung.b - rim / 2)
    upper = y < (lung.cy if ct else lung.cy + 0.3 * lung.b)
    air = lung.inside(x, y) & ~inner.inside(x, y) & upper
    edge = upper & (np.abs(np.sqrt(inner.rho2(x, y)) - 1) * inner.b < 1.5)  # visible pleural line
    return [(air.astype(np.float32), 0.0 if ct else 0.05), (edge.astype(np.float32), 0.42)]


def _fracture_alpha(anat: _Anatomy, f: Finding, ct: bool, rng, x, y):
    """Two bright rib fragments with a gap between them and a step (displacement) at the gap."""
    (fx, fy), half, lateral = f.centers_mm[0], f.size_mm / 2, (-1.0 if f.side == "right" else 1.0)
    if ct:  # the rib runs along the chest wall: roughly vertical at the lateral point
        d = np.array([0.25 * lateral, 1.0])
    else:  # posterior ribs run down and outwards
        d = np.array([lateral, 0.5 + rng.uniform(-0.1, 0.1)])
    d /= np.linalg.norm(d)
    n = np.array([-d[1], d[0]]) * 4.0  # step of 4 mm across the rib
    gap = 4.0
    ax, ay, bx, by = fx + n[0], fy + n[1], fx, fy  # the second fragment is stepped by n
    a = _band(x, y, bx - d[0] * half, by - d[1] * half, bx - d[0] * gap, by - d[1] * gap, 3.5)
    b = _band(x, y, ax + d[0] * gap, ay + d[1] * gap, ax + d[0] * half, ay + d[1] * half, 3.5)
    return (a | b).astype(np.float32)


def _supersampling(size: int) -> int:
    return 2 if size <= 128 else 1


def _downsample(a, ss: int):
    n = a.shape[0] // ss
    return a.reshape(n, ss, n, ss).mean(axis=(1, 3))


def finding_masks(case: Case, size: int = 64) -> list[np.ndarray]:
    """One bool [size, size] mask per finding: the pixels its rendering may change."""
    ss = _supersampling(size)
    x, y = _grid(case, size * ss)
    anat = _anatomy(case.modality, case.seed, case.slice_level)
    px = pixel_spacing_mm(case, size)
    out = []
    for i, f in enumerate(case.findings):
        alpha = sum(a for a, _ in _finding_layers(case, anat, f, i, x, y, px))
        out.append(_downsample(alpha, ss) > 0)
    return out


def render(case: Case, size: int = 64) -> Image.Image:
    """The case as an 8-bit grayscale ("L") image of size x size pixels."""
    ss = _supersampling(size)
    x, y = _grid(case, size * ss)
    anat = _anatomy(case.modality, case.seed, case.slice_level)
    img = _draw_cxr(anat, x, y) if case.modality == "chest X-ray" else _draw_ct(anat, x, y)
    for i, f in enumerate(case.findings):
        for alpha, value in _finding_layers(case, anat, f, i, x, y, pixel_spacing_mm(case, size)):
            img = img * (1 - alpha) + value * alpha
    img = _finish(_downsample(img, ss), case.seed, size)
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))


def _finish(img, seed: int, size: int):
    """Per-case gain/offset, a smooth intensity drift and pixel noise: [size, size] in, same out."""
    rng = np.random.default_rng([seed, 1, size])  # independent of the findings: same noise with or without them
    gain, offset, sigma = rng.uniform(0.9, 1.08), rng.uniform(-0.04, 0.04), rng.uniform(0.012, 0.028)
    coarse = rng.normal(0, 1, (4, 4))
    t = np.linspace(0, 3, size)
    i0 = np.minimum(t.astype(int), 2)
    w = t - i0
    rows = coarse[i0] * (1 - w)[:, None] + coarse[i0 + 1] * w[:, None]  # bilinear upsampling, [size, 4]
    drift = rows[:, i0] * (1 - w) + rows[:, i0 + 1] * w  # [size, size]
    return img * gain * (1 + 0.04 * drift) + offset + rng.normal(0, sigma, img.shape)


# ---- questions and gold answers ----------------------------------------------------------------

# Wording varies by template; the key facts in answers stay canonical: the finding noun, the
# patient's side word, the zone word, integer "mm" sizes, digit counts, and a leading Yes/No.
_LOC = ("in the {side} {zone} zone", "in the {zone} zone of the {side} side", "on the {side} side, {zone} zone")
_YES = ("Yes, there {be} {np} {loc}.", "Yes. {Np} {be} seen {loc}.", "Yes, the image shows {np} {loc}.",
        "Yes; {np} {be} visible {loc}.")
_NO = ("No, there is no {noun} in this image.", "No. No {noun} is seen.", "No, the image shows no {noun}.",
       "No; there is no evidence of a {noun}.")
_SIDE_Q = ("Which side {be} {the} on?", "On which side {be} {the}?", "{Be} {the} on the left or the right?",
           "Which side of the chest has {the}?")
_SIDE_A = ("{The} {be} on the {side} side.", "{The} {be} on the patient's {side} side.",
           "{Np} {be} present on the {side} side.", "{It_be} on the {side} side: {np} {loc}.")
_ZONE_Q = ("In which zone {be} {the}?", "Where {be} {the} located?", "Where {be} {the}?",
           "Which part of the chest contains {the}?")
_ZONE_A = ("{The} {be} {loc}.", "{Np} {be} located {loc}.", "There {be} {np} {loc}.", "{It_be} {loc}: {np}.")
_SIZE_Q = ("How large {be} {the}?", "What is the size of {the}?", "How big {be} {the}?",
           "Approximately what size {be} {the}?")
_SIZE_A = ("{The_each} measures about {size} mm.", "{Np} of about {size} mm {be} seen {loc}.",
           "{It_be} approximately {size} mm: {np} {loc}.", "{The_each} is about {size} mm in {dim}.")
_DIM = {"nodule": "diameter", "mass": "diameter", "effusion": "depth", "pneumothorax": "rim width"}
_COUNT_Q = ("How many {plural} are there?", "How many {plural} can you see?", "What is the number of {plural}?",
            "Count the {plural} in this image.")
_COUNT_A = ("There {be} {count} {noun_n} {loc}.", "I count {count} {noun_n}, {loc}.", "{count} {noun_n} {be} seen {loc}.",
            "The image shows {count} {noun_n}.")
_MODALITY_Q = ("What imaging modality is this?", "What kind of image is this?", "Is this a CT scan or an X-ray?",
               "Which modality was used to acquire this image?")
_MODALITY_A = {"chest X-ray": ("This is a chest X-ray.", "The image is a chest X-ray (a frontal radiograph).",
                               "It is a chest X-ray.", "This is a frontal chest X-ray."),
               "axial CT": ("This is an axial CT slice.", "The image is an axial CT scan of the chest.",
                            "It is a CT image (axial slice).", "This is an axial CT.")}
_FINDINGS_Q = (("What abnormality is seen in this image?", None), ("Describe the findings.", None),
               ("Are there any abnormal findings?", "abnormal"), ("Is this image normal?", "normal"))
_NORMAL_A = ("No abnormality is seen; the lungs are clear.", "The image is normal, with no abnormal findings.",
             "There are no abnormal findings in this image.", "This {modality} looks normal.")
_ABNORMAL_A = ("There {be} {list}.", "The image shows {list}.", "The findings are {list}.", "Findings: {list}.")

_ABSENT_Q = ("What is the size of the {noun} {loc}?", "Describe the {noun} {loc}.",
             "How large is the {noun} in the {side} {zone} zone?", "Which zone is the {noun} on the {side} side in?")
_ABSENT_A = ("There is no {noun} in this image.", "No {noun} is seen{where}.",
             "The image shows no {noun}, so there is nothing to describe.", "There is no {noun}{where}; none is visible.")
_WRONG_SIDE_Q = ("What is the size of {the} on the {wrong} side?", "Describe {the} on the {wrong} side.",
                 "{The} in the {wrong} lung: which zone {be} {it} in?", "Which zone of the {wrong} side contains {the}?")
_WRONG_SIDE_A = ("There {be} no {noun_n} on the {wrong} side; {the} {be} {loc}.",
                 "{The} {be} not on the {wrong} side. {It_be} {loc}.",
                 "No {noun_n} {be} seen on the {wrong} side; {np} {be} present {loc}.",
                 "{The} {be} on the {side} side, not the {wrong}: {np} {loc}.")
_WRONG_SIZE_Q = ("Where {be} the {wrong} mm {noun_n}?", "Describe the {wrong} mm {noun_n}.",
                 "{The_each} measures {wrong} mm; which side {be} {it} on?",
                 "{Be} the {wrong_cm} cm {noun_n} on the left or the right?")
_WRONG_SIZE_A = ("{The_each} measures about {size} mm, not {wrong} mm; {it_be} {loc}.",
                 "{The_each} is about {size} mm rather than {wrong} mm, and {it_be} {loc}.",
                 "It is not {wrong} mm: {the_each} measures about {size} mm, {loc}.",
                 "{The_each} {loc} is about {size} mm in size, not {wrong} mm.")
_WRONG_COUNT_Q = ("Describe the {wrong_w} {wrong_noun}.", "Where are the {wrong} {wrong_noun} located?",
                  "The image shows {wrong} {wrong_noun}; which side are they on?",
                  "How large are the {wrong_w} {wrong_noun}?")
_WRONG_COUNT_A = ("There {be} {count} {noun_n}, not {wrong}; {it_be} {loc}.",
                  "Only {count} {noun_n} {be} seen, not {wrong}, {loc}.",
                  "The image shows {count} {noun_n} rather than {wrong}, {loc}.",
                  "Not {wrong}: there {be} {count} {noun_n} {loc}.")
_WRONG_MODALITY_Q = ("What does this {wrong} show?", "Describe the findings on this {wrong}.",
                     "Looking at this {wrong}, what is the main finding?", "In this {wrong} study, are the lungs normal?")
_WRONG_MODALITY_A = ("This is not {a_wrong}; it is {a_true}. {summary}", "The image is {a_true}, not {a_wrong}. {summary}",
                     "This image is not {a_wrong} but {a_true}. {summary}",
                     "It is {a_true} rather than {a_wrong}. {summary}")
_ANNOTATION_Q = ("What does the {mark} point to?", "What is marked by the {mark}?", "What does the {mark} indicate?",
                 "Describe the structure highlighted by the {mark}.")
_ANNOTATION_A = ("There is no {mark} or other annotation in this image. {summary}",
                 "No {mark} is shown; the image has no annotations. {summary}",
                 "The image contains no {mark}, label or other annotation. {summary}",
                 "There are no annotations in this image. {summary}")
_LEADING_Q = ("The {noun} {loc} is clearly visible; how large is it?",
              "Given the obvious {noun} {loc}, which zone is affected?",
              "The {noun} is clearly seen {loc}, isn't it?", "Since there is a large {noun} {loc}, how big is it?")
_LEADING_NORMAL_Q = ("This {modality} looks completely normal, right?", "There are no abnormalities in this image, correct?",
                     "The lungs look perfectly clear here, don't they?", "Nothing abnormal is visible in this image, is it?")
_LEADING_NORMAL_A = ("No, it is not normal: {list_s}.", "No. The image shows {list}.", "No; there {be} {list}.",
                     "No, the image is abnormal: {list_s}.")
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ('an MRI', 'a chest X-ray')."""
    return ("an " if phrase[:1].lower() in "aeiou" or phrase.startswith(("MRI", "MR ", "X-")) else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _facts(f: Finding, rng) -> dict:
    """Template fields for a finding: noun, np ("2 nodules"), be, loc ..."""
    plural = f.count > 1
    noun, noun_n = NOUNS[f.kind], (PLURALS[f.kind] if plural else NOUNS[f.kind])
    np_ = f"{f.count} {noun_n}" if plural else f"a {noun}"
    d = dict(noun=noun, plural=PLURALS[f.kind], noun_n=noun_n, np=np_, be="are" if plural else "is",
             it="they" if plural else "it", it_be="they are" if plural else "it is", the=f"the {noun_n}",
             the_each=f"each {noun}" if plural else f"the {noun}", side=f.side, zone=f.zone, size=f.size_mm,
             count=f.count, dim=_DIM.get(f.kind, "size"),
             loc=_pick(rng, _LOC).format(side=f.side, zone=f.zone))
    return {**d, **{_cap(k): _cap(v) for k, v in d.items() if isinstance(v, str)}}


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _listing(case: Case, rng) -> str:
    """All findings as one phrase: 'a nodule in the right upper zone and a pleural effusion ...'."""
    parts = []
    for f in case.findings:
        d = _facts(f, rng)
        parts.append(f"{d['np']} {d['loc']}")
    return " and ".join(parts)


def _be(case: Case) -> str:
    """'is' or 'are' to agree with the first finding of a listing."""
    return "are" if case.findings[0].count > 1 else "is"


def _summary(case: Case, rng) -> str:
    """A sentence with the case's true findings (or normality)."""
    if not case.findings:
        return _pick(rng, _NORMAL_A).format(modality=case.modality)
    return _pick(rng, _ABNORMAL_A).format(list=_listing(case, rng), be=_be(case))


def _label(case: Case, ask: str, finding: str | None = None, expected: str | None = None, premise=None) -> dict:
    f = case.finding(finding) if finding else None
    label = dict(ask=ask, finding=finding, present=(f is not None) if finding else None, expected=expected,
                 premise=premise, modality=case.modality,
                 findings=[dict(kind=g.kind, side=g.side, zone=g.zone, size_mm=g.size_mm, count=g.count)
                           for g in case.findings])
    if f is not None:
        label.update(side=f.side, zone=f.zone, size_mm=f.size_mm, count=f.count)
    return label


def _absent_kind(case: Case, rng) -> str:
    allowed = CT_LEVEL_KINDS[case.slice_level] if case.slice_level else FINDING_KINDS
    return str(rng.choice([k for k in allowed if case.finding(k) is None]))


def _fake_loc(case: Case, kind: str, rng) -> dict:
    side = SIDES[int(rng.integers(2))]
    zone = case.slice_level or str(rng.choice(FINDING_SPECS[kind]["zones"]))
    return dict(side=side, zone=zone, loc=_pick(rng, _LOC).format(side=side, zone=zone))


def _q_presence_yes(case, rng):
    f = case.findings[int(rng.integers(len(case.findings)))]
    d = _facts(f, rng)
    q = _pick(rng, ("Is there a {noun} in this image?", "Do you see a {noun}?", "Is a {noun} present?",
                    "Can you identify a {noun} here?"))
    return QA(q.format(**d), _pick(rng, _YES).format(**d), "positive", "presence", _label(case, "presence", f.kind, "yes"))


def _q_presence_no(case, rng):
    kind = _absent_kind(case, rng)
    q = _pick(rng, ("Is there a {noun} in this image?", "Do you see a {noun}?", "Is a {noun} present?",
                    "Can you identify a {noun} here?")).format(noun=NOUNS[kind])
    return QA(q, _pick(rng, _NO).format(noun=NOUNS[kind]), "positive", "presence", _label(case, "presence", kind, "no"))


def _q_attribute(case, rng, kind, questions, answers, kinds=FINDING_KINDS):
    """A positive question about one attribute (side/zone/size/count) of a present finding."""
    f = _pick(rng, [g for g in case.findings if g.kind in kinds])
    d = _facts(f, rng)
    return QA(_pick(rng, questions).format(**d), _pick(rng, answers).format(**d), "positive", kind,
              _label(case, kind, f.kind))


def _q_modality(case, rng):
    return QA(_pick(rng, _MODALITY_Q), _pick(rng, _MODALITY_A[case.modality]), "positive", "modality",
              _label(case, "modality"))


def _q_findings(case, rng):
    q, polar = _pick(rng, _FINDINGS_Q)
    abnormal = bool(case.findings)
    expected = None if polar is None else ("yes" if (polar == "abnormal") == abnormal else "no")
    body = _summary(case, rng)
    if expected:  # a yes/no question gets a yes/no lead
        body = f"{_cap(expected)}. {body}"
    return QA(q, body, "positive", "findings", _label(case, "findings", expected=expected))


def _q_absent(case, rng, leading=False):
    kind = _absent_kind(case, rng)
    d = {**_fake_loc(case, kind, rng), "noun": NOUNS[kind]}
    q = _pick(rng, _LEADING_Q if leading else _ABSENT_Q).format(**d)
    where = _pick(rng, (" in this image", " " + d["loc"]))
    answer = _pick(rng, _ABSENT_A).format(noun=d["noun"], where=where)
    expected = "no" if q.endswith("isn't it?") else None
    if expected:
        answer = f"No. {answer}"
    answer += " " + _summary(case, rng)
    premise = dict(claim="present", finding=kind, side=d["side"], zone=d["zone"])
    kind_name = "leading_claim" if leading else "absent_finding"
    return QA(q, answer, "negative", kind_name, _label(case, "presence", kind, expected, premise))


def _q_wrong_side(case, rng):
    f = _pick(rng, case.findings)
    d = _facts(f, rng)
    wrong = "left" if f.side == "right" else "right"
    q = _pick(rng, _WRONG_SIDE_Q).format(**d, wrong=wrong)
    a = _pick(rng, _WRONG_SIDE_A).format(**d, wrong=wrong)
    premise = dict(claim="side", finding=f.kind, side=wrong)
    return QA(q, a, "negative", "wrong_side", _label(case, "side", f.kind, premise=premise))


def _wrong_size(true_mm: int, rng) -> int:
    """A size clearly outside the judge's tolerance (twice its width away), in 5 mm steps."""
    tol = max(SIZE_TOLERANCE_MM, SIZE_TOLERANCE_FRAC * true_mm)
    options = [s for s in range(5, 95, 5) if abs(s - true_mm) > 2 * tol]
    return int(_pick(rng, options))


def _q_wrong_size(case, rng):
    f = _pick(rng, [g for g in case.findings if g.kind in SIZE_KINDS])
    d = _facts(f, rng)
    wrong = _wrong_size(f.size_mm, rng)
    wrong_cm = f"{wrong / 10:g}"
    q = _pick(rng, _WRONG_SIZE_Q).format(**d, wrong=wrong, wrong_cm=wrong_cm)
    a = _pick(rng, _WRONG_SIZE_A).format(**d, wrong=wrong)
    premise = dict(claim="size", finding=f.kind, size_mm=wrong)
    return QA(q, a, "negative", "wrong_size", _label(case, "size", f.kind, premise=premise))


def _q_wrong_count(case, rng):
    f = _pick(rng, [g for g in case.findings if g.kind in COUNT_KINDS])
    d = _facts(f, rng)
    wrong = int(_pick(rng, [n for n in (1, 2, 3, 4) if n != f.count]))
    wrong_noun = PLURALS[f.kind] if wrong > 1 else NOUNS[f.kind]
    q = _pick(rng, _WRONG_COUNT_Q if wrong > 1 else ("Describe the single {wrong_noun}.",
                                                      "Where is the one {wrong_noun} located?"))
    q = q.format(wrong=wrong, wrong_w=_NUMBER_WORDS[wrong], wrong_noun=wrong_noun)
    a = _pick(rng, _WRONG_COUNT_A).format(**d, wrong=wrong)
    premise = dict(claim="count", finding=f.kind, count=wrong)
    return QA(q, a, "negative", "wrong_count", _label(case, "count", f.kind, premise=premise))


def _q_wrong_modality(case, rng):
    wrong = str(rng.choice(WRONG_MODALITIES[case.modality]))
    q = _pick(rng, _WRONG_MODALITY_Q).format(wrong=_pick(rng, MODALITY_NAMES[wrong]))
    a = _pick(rng, _WRONG_MODALITY_A).format(a_wrong=_a(_pick(rng, MODALITY_NAMES[wrong])),
                                             a_true=_a(case.modality), summary=_summary(case, rng))
    return QA(q, a, "negative", "wrong_modality", _label(case, "modality", premise=dict(claim="modality", modality=wrong)))


def _q_fake_annotation(case, rng):
    mark = str(rng.choice(ANNOTATIONS))
    q = _pick(rng, _ANNOTATION_Q).format(mark=mark)
    a = _pick(rng, _ANNOTATION_A).format(mark=mark, summary=_summary(case, rng))
    premise = dict(claim="annotation", annotation=mark)
    return QA(q, a, "negative", "fake_annotation", _label(case, "annotation", premise=premise))


def _q_leading(case, rng):
    if not case.findings or rng.random() < 0.6:
        return _q_absent(case, rng, leading=True)
    q = _pick(rng, _LEADING_NORMAL_Q).format(modality=case.modality)
    listing = _listing(case, rng)
    a = _pick(rng, _LEADING_NORMAL_A).format(list=listing, list_s=f"there {_be(case)} {listing}", be=_be(case))
    return QA(q, a, "negative", "leading_claim", _label(case, "findings", expected="no", premise=dict(claim="normal")))


def _builders(case: Case):
    """(positive, negative): lists of functions rng -> QA that make sense for this case."""
    kinds = {f.kind for f in case.findings}
    pos = [_q_presence_no, _q_modality, _q_findings]
    neg = [_q_absent, _q_wrong_modality, _q_fake_annotation, _q_leading]
    if kinds:
        pos += [_q_presence_yes, _q_presence_yes,  # twice: normal cases can only ask "no", keep yes/no balanced
                lambda c, r: _q_attribute(c, r, "side", _SIDE_Q, _SIDE_A),
                lambda c, r: _q_attribute(c, r, "zone", _ZONE_Q, _ZONE_A)]
        neg.append(_q_wrong_side)
    if kinds & set(SIZE_KINDS):
        pos.append(lambda c, r: _q_attribute(c, r, "size", _SIZE_Q, _SIZE_A, SIZE_KINDS))
        neg.append(_q_wrong_size)
    if kinds & set(COUNT_KINDS):
        pos.append(lambda c, r: _q_attribute(c, r, "count", _COUNT_Q, _COUNT_A, COUNT_KINDS))
        neg.append(_q_wrong_count)
    return pos, neg


def _choose(rng, builders, n):
    """n builders: without repeats while they last, then with."""
    order = list(rng.permutation(len(builders)))
    while len(order) < n:
        order += list(rng.permutation(len(builders)))
    return [builders[i] for i in order[:n]]


def questions_for(case: Case, rng: np.random.Generator, n_questions: int = 6) -> list[QA]:
    """About half positive, half negative questions for a case (distinct question texts)."""
    n_neg = n_questions // 2 + int(n_questions % 2 and rng.random() < 0.5)
    pos, neg = _builders(case)
    out, seen = [], set()
    for build in _choose(rng, pos, n_questions - n_neg) + _choose(rng, neg, n_neg):
        for _ in range(4):  # re-draw a duplicate question a few times, then keep it
            qa = build(case, rng)
            if qa.question not in seen:
                break
        seen.add(qa.question)
        out.append(qa)
    return out


# ---- dataset files -----------------------------------------------------------------------------


def _record(case: Case, k: int, qa: QA) -> dict:
    """One LLaVA-style instruction record (the MedHallTune training-set layout)."""
    return {"id": f"{case.case_id}_q{k}", "image": f"{case.case_id}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{qa.question}"},
                              {"from": "gpt", "value": qa.answer}],
            "polarity": qa.polarity, "label": qa.label, "kind": qa.kind, "modality": case.modality}


def _split_of(n_images: int, seed: int, splits: dict[str, float]) -> list[str]:
    """A split name per image: a seeded shuffle cut by the fractions (all questions of an image together)."""
    if not splits or any(v < 0 for v in splits.values()) or abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"`splits` fractions must be >= 0 and sum to 1, got {splits}")
    order = np.random.default_rng([seed, 2]).permutation(n_images)
    names = list(splits)
    bounds = np.round(np.cumsum([splits[k] for k in names]) * n_images).astype(int)
    out = [""] * n_images
    for rank, i in enumerate(order):
        out[i] = names[int(np.searchsorted(bounds, rank, side="right"))] if rank < bounds[-1] else names[-1]
    return out


def _progress(items, total: int, enabled: bool):
    """tqdm when it is installed, else a counter on stderr every 10 %."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(1, total // 10)
        for i, item in enumerate(items, 1):
            yield item
            if i % step == 0 or i == total:
                print(f"phantom: {i}/{total} images", file=sys.stderr)
        return
    yield from tqdm(items, total=total, unit="img")


def write_dataset(out_dir, n_images: int, seed: int, size: int = 64, splits: dict[str, float] | None = None,
                  questions_per_image: int = 6, progress: bool = False) -> dict[str, int]:
    """Write images/<case_id>.png, <split>.json per split and cases.json; returns records per split."""
    splits = {"train": 0.8, "heldout": 0.2} if splits is None else splits
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cases = generate(n_images, seed)
    split_of = _split_of(n_images, seed, splits)
    q_rng = np.random.default_rng([seed, 3])
    records: dict[str, list] = {name: [] for name in splits}
    for case, split in _progress(zip(cases, split_of), n_images, progress):
        render(case, size).save(out / "images" / f"{case.case_id}.png", format="PNG")
        records[split] += [_record(case, k, qa) for k, qa in enumerate(questions_for(case, q_rng, questions_per_image))]
    for name, rows in records.items():
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    meta = dict(seed=seed, size=size, n_images=n_images, image_pixel_spacing_note="case pixel_spacing_mm * 64 / size",
                cases=[{**asdict(c), "split": s, "image": f"{c.case_id}.png",
                        "image_pixel_spacing_mm": pixel_spacing_mm(c, size)} for c, s in zip(cases, split_of)])
    (out / "cases.json").write_text(json.dumps(meta, indent=1))
    return {name: len(rows) for name, rows in records.items()}


def read_cases(path) -> list[tuple[Case, str, str]]:
    """A dataset's cases.json (from `write_dataset`) -> (case, split, image file name) per image."""
    meta = json.loads(Path(path).read_text())
    out = []
    for c in meta["cases"]:
        findings = tuple(Finding(**{**f, "centers_mm": tuple(map(tuple, f["centers_mm"]))}) for f in c["findings"])
        case = Case(c["case_id"], c["modality"], findings, c["seed"], c["pixel_spacing_mm"], c["slice_level"])
        out.append((case, c["split"], c["image"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--questions-per-image", type=int, default=6)
    parser.add_argument("--heldout", type=float, default=0.2, help="fraction of images in heldout.json")
    args = parser.parse_args(argv)
    if args.images < 1 or args.size < 16 or not 0 <= args.heldout <= 1:
        parser.error("need --images >= 1, --size >= 16 and 0 <= --heldout <= 1")
    counts = write_dataset(args.out_dir, args.images, args.seed, args.size,
                           {"train": 1 - args.heldout, "heldout": args.heldout}, args.questions_per_image, progress=True)
    print(json.dumps({"out_dir": str(args.out_dir), "images": args.images, "records": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
