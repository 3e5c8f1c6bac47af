"""The guard's scores against labels: p_hallucination, premise_risk and the four MedHallTune scores.

The arithmetic is training/metrics.py's (AUROC, AUPRC, Spearman, ECE,
reliability bins); this module picks what to measure against what, rounds
for the report (NaN -> None: one class only, or too few rows), and draws the
reliability diagram.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import SCORE_NAMES
from training.heads import safe
from training.metrics import auprc, auroc, ece, reliability, spearman


def scores_of(responses) -> np.ndarray:
    """[N, 4] predicted MedHallTune scores (NaN where the guard could not score)."""
    return np.array([[getattr(r.scores, n) for n in SCORE_NAMES] if r.HasField("scores") else [np.nan] * 4
                     for r in responses], float)


def probability_of(responses, field: str) -> np.ndarray:
    return np.array([getattr(r, field) if r.HasField(field) else np.nan for r in responses], float)


def binary(labels, probs) -> dict:
    """How well `probs` separates labels 1 from 0, and how well calibrated it is."""
    labels, probs = np.asarray(labels, bool), np.asarray(probs, float)
    keep = np.isfinite(probs)
    labels, probs = labels[keep], probs[keep]
    out = {"n": int(len(labels)), "positives": int(labels.sum()), "unscored": int((~keep).sum())}
    if not len(labels):
        return {**out, "auroc": None, "auprc": None, "ece": None, "reliability": []}
    return {**out, "auroc": safe(auroc(labels, probs)), "auprc": safe(auprc(labels, probs)),
            "ece": safe(ece(labels, probs)), "reliability": reliability(labels, probs)}


def correlations(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Spearman of each predicted score with the reference's, over rows where both exist."""
    out = {}
    for k, name in enumerate(SCORE_NAMES):
        keep = np.isfinite(predicted[:, k]) & np.isfinite(reference[:, k])
        out[name] = safe(spearman(predicted[keep, k], reference[keep, k]))
    return out


def reliability_png(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """One reliability diagram with a line per curve (name -> reliability bins); None if nothing to draw."""
    curves = {name: bins for name, bins in curves.items() if any(b["count"] for b in bins)}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="gray", label="perfectly calibrated")
    for name, bins in curves.items():
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["observed"] for b in used], marker="o", label=name)
    ax.set(xlabel="predicted probability (bin mean)", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1),
           title="Reliability of the guard's probabilities")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
