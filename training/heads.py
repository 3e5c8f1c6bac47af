"""Fit the guard heads on features from the tuned model's own hidden states.

Each source labels only some targets: PhantomVQA generations carry exact
hallucination labels, scored LLaVA-Med answers carry GPT-4o's four scores, and
every question carries its polarity.
- hallucination: a small torch MLP (BCE), saved as the numpy `guard.head.MLPHead`;
- scores: ridge regression on the score logits (1-10 mapped through logit((s-1)/9),
  as `guard.head` decodes them), its alpha picked by cross-validation grouped by image;
- premise: L2 logistic regression on the question's mean hidden states beside a
  TF-IDF of the question's token-id unigrams and bigrams (`guard.head.QuestionNgrams`),
  its C, the hidden block's weight and its training rows (MedHallTune only, or
  PhantomVQA too) picked the same way, by the AUROC on MedHallTune rows. Linear
  heads, because on ~1k MedHallTune rows the MLPs overfit: measured on the
  default model, these beat them on held-out images.
Temperatures are fitted on a held-out calibration fold (also split by image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.head import LinearHead, MLPHead, QuestionNgrams


@dataclass(frozen=True)
class HeadFitConfig:
    width: int = 64
    """Hidden units of each MLP."""
    steps: int = 400
    """Full-batch Adam steps."""
    lr: float = 3e-3
    weight_decay: float = 1e-2
    dropout: float = 0.1
    seed: int = 0
    premise_refit: bool = True
    """Serve a premise head refit on every row, the calibration fold too: its C, hidden weight and rows
    picked again by grouped CV, its temperature the one fitted on the calibration fold for the head
    fitted without it (whose figures the metrics report). It has ~1k MedHallTune questions to learn
    from, and a fifth more helped: on five builds (the default recipe and four variants, two seeds) the held-out MedHallTune
    premise AUROC went from 0.941 / 0.938 / 0.914 / 0.954 / 0.934 to 0.946 / 0.942 / 0.932 / 0.954 / 0.947."""

    def __post_init__(self) -> None:
        if self.width < 1 or self.steps < 1:
            raise ValueError("`width` and `steps` must be at least 1")


def fit_mlp(x: np.ndarray, targets: np.ndarray, kinds: tuple[str, ...], cfg: HeadFitConfig) -> MLPHead:
    """x [N, F]; targets [N, K] with NaN where unlabelled; kinds[k] is "bce" (0/1) or "score" (1-10)."""
    import torch

    torch.manual_seed(cfg.seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    y = torch.from_numpy(targets.astype(np.float32))
    known = ~torch.isnan(y)
    y = torch.nan_to_num(y)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], cfg.width), torch.nn.GELU(approximate="tanh"),
        torch.nn.Dropout(cfg.dropout), torch.nn.Linear(cfg.width, targets.shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bce = [k == "bce" for k in kinds]
    for _ in range(cfg.steps):
        z = net(xt)
        loss = 0.0
        for k in range(targets.shape[1]):
            m = known[:, k]
            if not m.any():
                continue
            if bce[k]:
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(z[m, k], y[m, k])
            else:  # scores 1-10 -> sigmoid space, as guard.head decodes them
                loss = loss + torch.nn.functional.mse_loss(torch.sigmoid(z[m, k]), (y[m, k] - 1) / 9) * 4
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    w1, w2 = net[0], net[3]
    return MLPHead(mean=mean.astype(np.float32), std=std.astype(np.float32),
                   w1=w1.weight.detach().numpy().T.copy(), b1=w1.bias.detach().numpy().copy(),
                   w2=w2.weight.detach().numpy().T.copy(), b2=w2.bias.detach().numpy().copy())


RIDGE_ALPHAS = (100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)
LOGISTIC_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32)


def _cv_pick(make, grid, x, y, groups, score, folds: int = 5, train_rows=None, score_by=None, sample_weight=None):
    """The grid value whose model scores best (mean over GroupKFold folds); -> (value, its CV score).

    `train_rows` (boolean [N]) limits what each fold fits on; the folds themselves split every row,
    so choices made with different `train_rows` share them. `score_by` ([N] part labels, e.g. the
    source of each row) scores each part of a fold on its own and averages the parts, so each
    counts alike however many rows it has. `sample_weight` [N] goes to each fit.
    With fewer than two groups there is nothing to cross-validate: the middle of the grid, score NaN."""
    from sklearn.model_selection import GroupKFold

    folds = min(folds, len(set(groups.tolist())))
    if folds < 2:
        return grid[len(grid) // 2], float("nan")
    splits = list(GroupKFold(n_splits=folds).split(x, y, groups))
    if train_rows is not None:
        splits = [(tr[np.asarray(train_rows)[tr]], te) for tr, te in splits]
    parts = np.zeros(len(y), int) if score_by is None else np.unique(np.asarray(score_by), return_inverse=True)[1]

    def fold_score(v, tr, te):
        if not len(tr):  # nothing to fit in this fold
            return float("nan")
        m = make(v).fit(x[tr], y[tr], **({} if sample_weight is None else {"sample_weight": sample_weight[tr]}))
        return np.nanmean([score(y[idx], m, x[idx]) for k in np.unique(parts[te]) for idx in [te[parts[te] == k]]])

    results = []
    for v in grid:
        vals = [fold_score(v, tr, te) for tr, te in splits]
        results.append((float(np.nanmean(vals)), v))
    best_score, best = max(results, key=lambda r: r[0])
    return best, best_score


def fit_ridge_scores(x: np.ndarray, scores: np.ndarray, groups, alphas=RIDGE_ALPHAS) -> tuple[LinearHead, dict]:
    """x [N, F], scores [N, 4] (1-10) -> a LinearHead giving score logits, and the alpha picked."""
    from sklearn.linear_model import Ridge

    from training.metrics import spearman

    mean, std = _standardizer(x)
    z = (x - mean) / std
    p = np.clip((scores - 1.0) / 9.0, 0.02, 0.98)
    t = np.log(p / (1 - p))  # the logits guard.head decodes with 1 + 9 * sigmoid
    cv = lambda y, m, xt: np.nanmean([spearman(m.predict(xt)[:, k], y[:, k]) for k in range(y.shape[1])])  # noqa: E731
    alpha, cv_score = _cv_pick(lambda a: Ridge(alpha=a), alphas, z, t, np.asarray(groups), cv)
    reg = Ridge(alpha=alpha).fit(z, t)
    head = LinearHead(mean=mean, std=std, w=reg.coef_.T.astype(np.float32).copy(), b=reg.intercept_.astype(np.float32))
    return head, {"scores_ridge_alpha": alpha, "scores_cv_mean_spearman": safe(cv_score)}


PREMISE_CS = (1.0, 3.0, 10.0)
PREMISE_HIDDEN_WEIGHTS = (0.02, 0.05, 0.1, 0.2)
PREMISE_SOURCES = ("medhalltune", "all")
"""Rows the premise head may fit on: MedHallTune's only, or PhantomVQA's too."""


def fit_question_ngrams(question_ids: list, min_df: int = 2) -> QuestionNgrams:
    """The n-gram vocabulary and idf of sklearn's TfidfVectorizer (1-2 grams, smooth idf, sublinear tf)
    over token-id strings, as the numpy `QuestionNgrams` that serving runs."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(**NGRAM_TFIDF, min_df=min_df).fit([ids_text(q) for q in question_ids])
    keys = np.array([_ngram_key(term) for term in vec.vocabulary_], np.int64)
    idf = vec.idf_[list(vec.vocabulary_.values())]
    order = np.argsort(keys)
    return QuestionNgrams(keys=keys[order], idf=idf[order].astype(np.float32))


NGRAM_TFIDF = dict(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"\S+", lowercase=False)


def ids_text(ids) -> str:
    """Token ids -> the text TfidfVectorizer reads them from ("t12 t7 ...")."""
    return " ".join(f"t{int(t)}" for t in ids)


def _ngram_key(term: str) -> int:
    ids = [int(t[1:]) for t in term.split(" ")]
    return int(QuestionNgrams.ngram_keys(ids)[-1])  # a unigram's own key, or the bigram's


def ngram_matrix(ngrams: QuestionNgrams, question_ids: list):
    """-> the sparse [N, V] TF-IDF rows of `question_ids`, as serving computes them."""
    from scipy.sparse import csr_matrix

    parts = [ngrams.sparse(q) for q in question_ids]
    indptr = np.cumsum([0] + [len(at) for at, _ in parts])
    indices = np.concatenate([at for at, _ in parts]) if parts else np.zeros(0, np.int64)
    values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.float32)
    return csr_matrix((values, indices, indptr), shape=(len(parts), len(ngrams)))


def source_balance(medhalltune: np.ndarray) -> np.ndarray:
    """Sample weights [N] under which each source (MedHallTune or not) weighs alike, mean 1:
    PhantomVQA's questions outnumber MedHallTune's."""
    part = np.asarray(medhalltune, bool).astype(int)
    counts = np.bincount(part, minlength=2)
    return (len(part) / ((counts > 0).sum() * np.maximum(counts, 1)))[part]


class _HiddenAndNgrams:
    """Logistic regression on [standardized hidden block x weight, n-gram block]; x is sparse [N, H + V]."""

    def __init__(self, c: float, weight: float, hidden: int):
        from sklearn.linear_model import LogisticRegression

        self.weight, self.hidden = weight, hidden
        self.clf = LogisticRegression(C=c, max_iter=5000)

    def _scale(self, x):
        from scipy.sparse import diags

        scale = np.ones(x.shape[1])
        scale[: self.hidden] = self.weight
        return x @ diags(scale)

    def fit(self, x, y, sample_weight=None):
        self.clf.fit(self._scale(x), y, sample_weight=sample_weight)
        return self

    def decision_function(self, x):
        return self.clf.decision_function(self._scale(x))


def fit_premise(hidden: np.ndarray, question_ids: list, labels: np.ndarray, groups, medhalltune: np.ndarray,
                cs=PREMISE_CS, weights=PREMISE_HIDDEN_WEIGHTS, sources=PREMISE_SOURCES):
    """The premise head on [question features, question n-grams]; -> (LinearHead, QuestionNgrams, info, rows).

    Its C, the hidden block's weight and its training rows (`sources`: MedHallTune's, or all, each
    source weighing alike in the loss) are picked by grouped CV, scored by the mean of the AUROC on
    MedHallTune questions (`medhalltune`, boolean [N]) and on the others: the served head judges
    both kinds. `rows` marks the rows it was fitted on."""
    from scipy.sparse import csr_matrix, hstack

    from training.metrics import auroc

    y = np.asarray(labels).astype(int)
    groups, mht = np.asarray(groups), np.asarray(medhalltune, bool)
    cv = lambda yt, m, xt: auroc(yt, m.decision_function(xt))  # noqa: E731
    sources_of, balance = mht.astype(int), source_balance(mht)
    picks = {}
    for source in sources:
        rows = mht if source == "medhalltune" else np.ones(len(y), bool)
        ngrams = fit_question_ngrams([question_ids[i] for i in np.flatnonzero(rows)])
        mean, std = _standardizer(hidden[rows])
        x = hstack([csr_matrix((hidden - mean) / std), ngram_matrix(ngrams, question_ids)]).tocsr()
        make = lambda v: _HiddenAndNgrams(v[0], v[1], hidden.shape[1])  # noqa: E731
        (c, w), score = _cv_pick(make, [(c, w) for c in cs for w in weights], x, y, groups, cv,
                                 train_rows=rows, score_by=sources_of, sample_weight=balance)
        picks[source] = (score, c, w, rows, ngrams, mean, std, x)
    source = max(picks, key=lambda k: -np.inf if np.isnan(picks[k][0]) else picks[k][0])
    score, c, w, rows, ngrams, mean, std, x = picks[source]
    model = _HiddenAndNgrams(c, w, hidden.shape[1]).fit(x[rows], y[rows], sample_weight=balance[rows])
    coef = model.clf.coef_.T.astype(np.float32)
    head = LinearHead(mean=np.concatenate([mean, np.zeros(len(ngrams), np.float32)]),
                      std=np.concatenate([std / np.float32(w), np.ones(len(ngrams), np.float32)]),
                      w=coef.copy(), b=model.clf.intercept_.astype(np.float32))
    info = {"premise_logistic_c": c, "premise_hidden_weight": w, "premise_fit_rows": source,
            "premise_ngram_vocabulary": len(ngrams), "premise_cv_auroc": safe(score),
            **{f"premise_cv_auroc_fit_on_{k}": safe(v[0]) for k, v in picks.items()}}
    return head, ngrams, info, rows


def group_folds(groups: list[str], fraction: float, seed: int = 0) -> np.ndarray:
    """True for rows whose group (image) hashes into the held-out `fraction`; stable across runs."""
    import hashlib

    def bucket(g: str) -> float:
        return int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 2**32

    return np.array([bucket(g) < fraction for g in groups])


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, float)))


def safe(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


# --- collecting features and fitting both heads -----------------------------

@dataclass
class FeatureRows:
    """Rows for the heads. NaN marks a target a source does not label."""

    answer_x: list
    answer_y: list  # [p_hall label, 4 scores]
    answer_group: list
    premise_x: list
    premise_y: list
    premise_group: list
    premise_ids: list
    """The question's token ids (`Generation.question_ids`), for its n-grams."""
    premise_source: list
    """Where the question comes from: "phantom" or "medhalltune"."""

    @classmethod
    def empty(cls) -> "FeatureRows":
        return cls([], [], [], [], [], [], [], [])

    def add(self, gens, hall=None, scores=None, premise=None, groups=None, source: str = "") -> None:
        from guard.head import answer_features, prompt_features

        for i, g in enumerate(gens):
            y = [np.nan] * 5
            if hall is not None:
                y[0] = float(hall[i])
            if scores is not None and scores[i] is not None:
                y[1:] = list(scores[i])
            self.answer_x.append(answer_features(g))
            self.answer_y.append(y)
            self.answer_group.append(groups[i])
            if premise is not None:
                self.premise_x.append(prompt_features(g))
                self.premise_y.append(float(premise[i]))
                self.premise_group.append(groups[i])
                self.premise_ids.append(np.asarray(g.question_ids, np.int64))
                self.premise_source.append(source)


def fit_heads(rows: FeatureRows, cfg: HeadFitConfig = HeadFitConfig(), calib_fraction: float = 0.2):
    """-> (GuardHeads, metrics on the calibration fold). Folds are split by group (image)."""
    from guard.head import SCORE_NAMES, GuardHeads
    from training.metrics import auroc, ece, fit_temperature, spearman

    ax, ay = np.stack(rows.answer_x), np.array(rows.answer_y, float)
    px, py = np.stack(rows.premise_x), np.array(rows.premise_y, float)
    a_group, p_group = np.array(rows.answer_group), np.array(rows.premise_group)
    a_cal, p_cal = group_folds(rows.answer_group, calib_fraction, cfg.seed), group_folds(rows.premise_group, calib_fraction, cfg.seed)
    hall, scored = ~np.isnan(ay[:, 0]), ~np.isnan(ay[:, 1])
    fit_h, fit_s = hall & ~a_cal, scored & ~a_cal
    hallucination = fit_mlp(ax[fit_h], ay[fit_h, :1], ("bce",), cfg)
    if fit_s.sum() >= 2:
        scores, s_info = fit_ridge_scores(ax[fit_s], ay[fit_s, 1:], a_group[fit_s])
    else:  # no scored answers: every score is the scale's middle, and the record says why
        mean, std = _standardizer(ax)
        scores = LinearHead(mean=mean, std=std, w=np.zeros((ax.shape[1], len(SCORE_NAMES)), np.float32),
                            b=np.zeros(len(SCORE_NAMES), np.float32))
        s_info = {"scores_ridge_alpha": None, "note": "no scored answers: the score head outputs 5.5"}
    p_ids = rows.premise_ids
    mht = np.array([src == "medhalltune" for src in rows.premise_source])
    target = mht if mht.any() else np.ones(len(py), bool)  # the questions the premise head is judged on
    fit_p, sources = ~p_cal, PREMISE_SOURCES if mht.any() else ("all",)
    premise, ngrams, p_info, p_rows = fit_premise(
        px[fit_p], [p_ids[i] for i in np.flatnonzero(fit_p)], py[fit_p], p_group[fit_p], target[fit_p],
        sources=sources)
    used = np.zeros(len(py), bool)
    used[np.flatnonzero(fit_p)[p_rows]] = True  # the training rows fit_premise chose
    same_source = mht if p_info["premise_fit_rows"] == "medhalltune" else np.ones(len(py), bool)

    def premise_logits(head, ngram_model, sel):
        x = px[sel] if ngram_model is None else np.concatenate(
            [px[sel], ngram_matrix(ngram_model, [p_ids[i] for i in np.flatnonzero(sel)]).toarray()], axis=1)
        return head(x)[:, 0]

    cal_h, cal_s = hall & a_cal, scored & a_cal
    cal_p = p_cal & same_source
    z_h, z_p = hallucination(ax[cal_h])[:, 0], premise_logits(premise, ngrams, cal_p)
    t_a = fit_temperature(z_h, ay[cal_h, 0]) if cal_h.any() else 1.0
    t_p = fit_temperature(z_p, py[cal_p])
    p_hall = sigmoid(z_h / t_a)
    metrics = {
        "answer_rows": int(len(ax)), "premise_rows": int(len(px)), "calib_fraction": calib_fraction,
        "p_hallucination_auroc": safe(auroc(ay[cal_h, 0], p_hall)),
        "p_hallucination_ece": safe(ece(ay[cal_h, 0], p_hall)) if cal_h.any() else None,
        "premise_auroc": safe(auroc(py[cal_p], z_p)),
        "premise_ece": safe(ece(py[cal_p], sigmoid(z_p / t_p))),
        "answer_temperature": round(t_a, 4), "premise_temperature": round(t_p, 4), **s_info, **p_info,
        "premise_ablation": premise_ablation(px, p_ids, py, p_group, used, p_cal, mht, premise, ngrams,
                                             premise_logits),
    }
    z_s = scores(ax[cal_s])
    for k, name in enumerate(SCORE_NAMES):
        metrics[f"{name}_spearman"] = safe(spearman(1 + 9 * sigmoid(z_s[:, k]), ay[cal_s, 1 + k]))
    if cfg.premise_refit:
        premise, ngrams, refit_info, _ = fit_premise(px, p_ids, py, p_group, target, sources=sources)
        metrics["premise_refit"] = {k: refit_info[k] for k in ("premise_logistic_c", "premise_hidden_weight",
                                                               "premise_fit_rows", "premise_ngram_vocabulary",
                                                               "premise_cv_auroc")}
    heads = GuardHeads(hallucination=hallucination, scores=scores, premise=premise, answer_temperature=t_a,
                       premise_temperature=t_p, trained=True, info={"calibration": metrics}, premise_ngrams=ngrams)
    return heads, metrics


def premise_ablation(px, p_ids, py, groups, used, cal, mht, served, ngrams, logits) -> dict:
    """Calibration-fold AUROC of premise heads fitted on the served head's rows (`used`, with the
    same source weights) from hidden states only, n-grams only, and both (the served head before
    its refit on every row, `HeadFitConfig.premise_refit`), on
    its MedHallTune and PhantomVQA questions."""
    from sklearn.linear_model import LogisticRegression

    from training.metrics import auroc

    ids = lambda sel: [p_ids[i] for i in np.flatnonzero(sel)]  # noqa: E731
    y, g, weight = py[used].astype(int), groups[used], source_balance(mht[used])
    cv = lambda yt, m, xt: auroc(yt, m.decision_function(xt))  # noqa: E731
    make = lambda c: LogisticRegression(C=c, max_iter=5000)  # noqa: E731

    def fit(x, cs):  # one block alone, fitted as the served head is: C by grouped CV, sources alike
        c, _ = _cv_pick(make, cs, x, y, g, cv, score_by=mht[used], sample_weight=weight)
        return make(c).fit(x, y, sample_weight=weight)

    mean, std = _standardizer(px[used])
    only_hidden = fit((px[used] - mean) / std, LOGISTIC_CS)
    only_ngrams = fit(ngram_matrix(ngrams, ids(used)), PREMISE_CS)
    heads = {"hidden": lambda sel: only_hidden.decision_function((px[sel] - mean) / std),
             "ngrams": lambda sel: only_ngrams.decision_function(ngram_matrix(ngrams, ids(sel))),
             "both": lambda sel: logits(served, ngrams, sel)}
    out = {}
    for part, rows in (("medhalltune", cal & mht), ("phantom", cal & ~mht)):
        if rows.any():
            out[part] = {name: safe(auroc(py[rows], f(rows))) for name, f in heads.items()}
    return out


def collect_features(tuned_dir: Path, labelled, scored, answer_models: list[Path], max_new_tokens: int = 48,
                     batch_size: int = 32, log=print) -> FeatureRows:
    """Features on `tuned_dir`'s hidden states for the three heads' training rows.

    - labelled: PhantomVQA rows; every model in `answer_models` answers them (greedy), the
      exact judge labels each answer, and the tuned model teacher-forces it -> p(hallucination).
    - scored: rows with another model's answer and GPT-4o's scores -> the four scores.
    - both give prompt features labelled by question polarity -> the premise head.
    """
    from guard.backends.torch_backend import load_model
    from guard.prompt import Prompter
    from guard.spec import spec_from_hf_dir
    from training.features import TorchModel, generate_batch, teacher_force_batch
    from training.phantom_judge import judge, qa_of
    from training.train import image_pixels

    spec = spec_from_hf_dir(tuned_dir)
    prompter = Prompter(Path(tuned_dir) / "tokenizer.json", spec)
    tuned = TorchModel(load_model(tuned_dir), spec)
    models = [tuned if Path(d) == Path(tuned_dir) else TorchModel(load_model(d), spec) for d in answer_models]
    eos = spec.eos_token_ids[0]
    rows = FeatureRows.empty()

    def encode(batch):
        prompts = [prompter.encode_prompt(e.question).tolist() for e in batch]
        return prompts, np.stack([image_pixels(e, spec.preprocess) for e in batch])

    n_hall = 0
    for start in range(0, len(labelled), batch_size):
        batch = labelled[start : start + batch_size]
        prompts, pixels = encode(batch)
        for i, model in enumerate(models):
            answers = generate_batch(model, prompts, pixels, max_new_tokens)
            labels = [judge(prompter.decode(a), qa_of(e)).hallucinated for e, a in zip(batch, answers)]
            n_hall += sum(labels)
            # one premise row per question: every model's answer shares the same prompt features
            premise = [e.polarity == "negative" for e in batch] if i == 0 else None
            rows.add(teacher_force_batch(tuned, prompts, answers, pixels), hall=labels, premise=premise,
                     groups=[e.image for e in batch], source="phantom")
    log(f"p(hallucination) rows: {len(labelled) * len(models)}, of which hallucinated: {n_hall}")
    for start in range(0, len(scored), batch_size):
        batch = scored[start : start + batch_size]
        prompts, pixels = encode(batch)
        answers = [prompter.encode_answer(e.model_answer or e.answer)[:128] + [eos] for e in batch]
        rows.add(teacher_force_batch(tuned, prompts, answers, pixels), scores=[e.scores for e in batch],
                 premise=[e.polarity == "negative" for e in batch], groups=[e.image for e in batch],
                 source="medhalltune")
    log(f"score rows: {len(scored)}; premise rows: {len(rows.premise_y)}")
    return rows


def save_heads(heads, model_dir: Path) -> None:
    from guard.spec import HEADS_FILE

    heads.save(Path(model_dir) / HEADS_FILE)
