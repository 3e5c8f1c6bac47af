"""Metrics for the guard: AUROC, AUPRC, ECE, Spearman, temperature scaling, text-only baselines,
and 95% intervals for all of them.

Thin wrappers over scikit-learn and SciPy that return plain floats, handle the
degenerate cases (one class only) by returning NaN instead of raising, and
give the report one vocabulary. The TF-IDF baselines are the bar a guard on
hidden states has to clear: a head that loses to a bag of words is not done.
"""

from __future__ import annotations

import math

import numpy as np


def auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else math.nan


def auprc(labels, scores) -> float:
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels)
    return float(average_precision_score(labels, scores)) if len(set(labels.tolist())) == 2 else math.nan


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def proportion_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate (SciPy): a held-out accuracy of 0.73 on 286 questions is a
    range, not a point. (nan, nan) when n is 0."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_interval(statistic, *columns, n_resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (SciPy) of `statistic(*columns)`, resampling rows, the same rows
    of every column (paired): e.g. an AUROC from (labels, scores), or a guard's AUROC minus a
    baseline's from (labels, guard scores, baseline scores) on the same questions. (nan, nan) when
    the statistic is undefined on the data or on some resample (one class only)."""
    from scipy.stats import bootstrap

    columns = [np.asarray(c, float) for c in columns]
    if len(columns[0]) < 2 or not math.isfinite(statistic(*columns)):
        return math.nan, math.nan
    ci = bootstrap(columns, statistic, paired=True, vectorized=False, n_resamples=n_resamples,
                   confidence_level=level, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def with_interval(value: float | None, bounds=None) -> str:
    """A report cell: "0.727 (0.673 to 0.776)" with its 95% interval, "0.727" without one, "n/a"."""
    if value is None:
        return "n/a"
    if not bounds or None in bounds:
        return f"{value:.3f}"
    return f"{value:.3f} ({bounds[0]:.3f} to {bounds[1]:.3f})"


def reliability(labels, probs, n_bins: int = 10) -> list[dict]:
    """Equal-width bins: count, mean confidence and observed rate per bin."""
    labels, probs = np.asarray(labels, float), np.asarray(probs, float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(probs, edges[1:-1]), 0, n_bins - 1)
    return [
        {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int((idx == b).sum()),
         "confidence": float(probs[idx == b].mean()) if (idx == b).any() else math.nan,
         "observed": float(labels[idx == b].mean()) if (idx == b).any() else math.nan}
        for b in range(n_bins)
    ]


def ece(labels, probs, n_bins: int = 10) -> float:
    """Expected calibration error: bin-weighted |observed rate - mean confidence|."""
    bins = reliability(labels, probs, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["observed"] - b["confidence"]) for b in bins if b["count"]))


def fit_temperature(logits, labels) -> float:
    """The T > 0 that minimizes the NLL of sigmoid(logits / T) on held-out labels."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, float), np.asarray(labels, float)

    def nll(log_t: float) -> float:
        p = 1 / (1 + np.exp(-z / math.exp(log_t)))
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def tfidf_classifier_scores(train_texts, train_labels, test_texts) -> np.ndarray:
    """Text-only baseline: TF-IDF (word 1-2 grams) + logistic regression -> P(label 1) per test text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                        LogisticRegression(C=4.0, max_iter=2000))
    clf.fit(list(train_texts), np.asarray(train_labels))
    return clf.predict_proba(list(test_texts))[:, 1]


def tfidf_regression_predictions(train_texts, train_targets, test_texts) -> np.ndarray:
    """Text-only baseline: TF-IDF + ridge regression -> [n_test, n_targets] predictions."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    train_targets, test_texts = np.asarray(train_targets, float), list(test_texts)
    reg = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True), Ridge(alpha=1.0))
    reg.fit(list(train_texts), train_targets)
    return reg.predict(test_texts).reshape(len(test_texts), -1)
