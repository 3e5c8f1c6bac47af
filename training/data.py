"""MedHallTune-format files -> `VqaExample`s, and back.

This module owns reading the three MedHallTune-style formats (the validation
JSONL, the GPT-4o-scored prediction JSONL and the LLaVA-style instruction JSON
list), tagging each row positive or negative, resolving image files, splitting
by image, mixing sources by weight, and writing the LLaVA JSON and the official
prediction format. It never opens an image, knows nothing of models or
tokenizers, and imports no torch: PIL is imported only inside `blank_image`.

Files are sniffed by content: a JSON list is LLaVA-style instruction data; JSON
lines with a `result` field are scored predictions; other JSON lines are
validation rows. One file is one source, named after its kind and polarity
("medhalltune-val-positive") or its file stem ("llava-json:<stem>", unless an
item names its own `source`), so positive and negative rows never share an id.
"""

from __future__ import annotations

import functools

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

POLARITIES = ("positive", "negative")
DEFAULT_MEDHALLTUNE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "medhalltune"
"""The development split beside the repository (../shared/data/medhalltune)."""
SCORE_NAMES = ("clinical_accuracy", "clinical_relevance", "detail_level", "risk_level")
BLANK_IMAGE_NOTE = (
    "NOTE: image files are missing; a blank mid-gray image stands in for them, so results do not reflect the images."
)

_IMAGE_MARKER = "<image>"
# Keys the LLaVA reader maps to fields; every other key of an item goes to `meta`.
_LLAVA_KEYS = frozenset({"id", "image", "conversations", "polarity", "scores", "model_answer", "caption", "source"})
# Keys the MedHallTune JSONL readers map to fields.
_VAL_KEYS = frozenset({"question_id", "image", "text", "gpt4_answer", "fig_caption"})
_PRED_KEYS = _VAL_KEYS | {"question", "answer", "result"}


class MissingImagesError(ValueError):
    """Rows name image files that are not under the image folder (or no folder was given)."""


class MalformedRowError(ValueError):
    """A row cannot be read (strict mode only; otherwise it is counted in `Dataset.malformed_rows`)."""


class PolarityError(ValueError):
    """Neither the rows nor the file name say whether the questions are positive or negative."""


@dataclass(frozen=True)
class VqaExample:
    id: str
    """Unique within a dataset: "<source>:<question_id or id>[:turn]"."""
    image: str
    """The image file name as given in the row."""
    image_path: Path | None
    """`image` resolved against the image folder; None when the file is missing."""
    question: str
    """The question, without the "<image>" marker and surrounding whitespace."""
    answer: str
    """The reference answer (`gpt4_answer`, or the gpt turn)."""
    polarity: str
    """"positive", or "negative" for hallucination-inducing questions."""
    source: str
    """Where the row came from, e.g. "medhalltune-val-positive" or "llava-json:<file stem>"."""
    model_answer: str | None = None
    """Another model's answer to the question (scored prediction files)."""
    scores: tuple[float, float, float, float] | None = None
    """GPT-4o's scores for `model_answer` (1-10): clinical accuracy, relevance, detail, risk level."""
    caption: str | None = None
    """The figure caption, when the row has one."""
    meta: dict = field(default_factory=dict)
    """Extra keys of the row that no field holds; written back as they came."""

    def __post_init__(self) -> None:
        for name in ("id", "image", "question", "answer", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
        if not self.id.startswith(self.source + ":"):
            raise ValueError(f"`id` must start with the source {self.source + ':'!r}, got {self.id!r}")
        if self.polarity not in POLARITIES:
            raise ValueError(f"`polarity` must be one of {POLARITIES}, got {self.polarity!r}")
        for name in ("model_answer", "caption"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"`{name}` must be a string or None, got {getattr(self, name)!r}")
        if self.scores is not None:
            _check_scores(self.scores)
        if not isinstance(self.meta, dict):
            raise ValueError(f"`meta` must be a dict, got {type(self.meta).__name__}")

    @property
    def question_id(self) -> int | str:
        """The row's own id (the part of `id` after the source), as an int when it is one."""
        key = self.id[len(self.source) + 1 :]
        return int(key) if key.isdigit() and str(int(key)) == key else key


def _check_scores(scores: tuple) -> None:
    if not isinstance(scores, tuple) or len(scores) != 4:
        raise ValueError(f"`scores` must be a tuple of 4 numbers, got {scores!r}")
    if not all(isinstance(s, float) and 1.0 <= s <= 10.0 for s in scores):
        raise ValueError(f"`scores` must be floats from 1 to 10, got {scores!r}")


@dataclass(frozen=True)
class Dataset:
    examples: list[VqaExample]
    """The rows that could be read, in file order."""
    missing_images: int
    """How many of `examples` have no image file (`image_path` is None)."""
    malformed_rows: list[str]
    """One message per row that was skipped or kept incomplete, naming file and row number."""
    sha256: dict[str, str]
    """Hex SHA-256 of each source file, keyed by its resolved path."""

    def __len__(self) -> int:
        return len(self.examples)

    def by_polarity(self) -> dict[str, int]:
        counts = dict.fromkeys(POLARITIES, 0)
        for ex in self.examples:
            counts[ex.polarity] += 1
        return counts

    def images(self) -> list[str]:
        return sorted({ex.image for ex in self.examples})


# ---------------------------------------------------------------- loading


def load_examples(
    path: str | Path,
    image_dir: str | Path | None = None,
    *,
    polarity: str | None = None,
    allow_missing_images: bool = False,
    strict: bool = False,
) -> Dataset:
    """Read one MedHallTune-format file (kind sniffed from its content).

    polarity: used for rows without a `polarity` key; by default taken from the
        file name ("negative" vs "positive"/"postive").
    allow_missing_images: keep rows whose image file is missing (image_path=None)
        instead of raising `MissingImagesError`.
    strict: raise `MalformedRowError` on the first bad row instead of counting it.
    """
    path = Path(path)
    if polarity is not None and polarity not in POLARITIES:
        raise ValueError(f"`polarity` must be one of {POLARITIES}, got {polarity!r}")
    raw = path.read_bytes()
    # 1) the file's rows as (row number, parsed object or error message)
    rows = _read_rows(raw.decode("utf-8"), path)
    # 2) each row -> examples, collecting problems
    examples, problems = _parse_rows(rows, path, polarity or _polarity_from_name(path), strict)
    # 3) image files
    examples, missing = _resolve_images(examples, image_dir, allow_missing_images)
    return Dataset(examples, missing, problems, {str(path.resolve()): hashlib.sha256(raw).hexdigest()})


def load_many(
    specs: list[tuple],
    n: int,
    *,
    image_dir: str | Path | None = None,
    allow_missing_images: bool = False,
    strict: bool = False,
    seed: int = 0,
) -> Dataset:
    """Load several files and `mix` `n` examples from them.

    Each spec is (path, weight) or (path, weight, image_dir); the 2-tuple form
    uses the `image_dir` keyword. Sampled examples repeat when a source is
    smaller than its share, so ids in the result are not unique then.
    """
    options = dict(allow_missing_images=allow_missing_images, strict=strict)
    loaded = [load_examples(spec[0], spec[2] if len(spec) > 2 else image_dir, **options) for spec in specs]
    _check_disjoint_ids([d.examples for d in loaded], [s[0] for s in specs])
    mixed = mix([(d.examples, float(spec[1])) for d, spec in zip(loaded, specs)], n, seed=seed)
    return Dataset(
        mixed,
        sum(ex.image_path is None for ex in mixed),
        [msg for d in loaded for msg in d.malformed_rows],
        {k: v for d in loaded for k, v in d.sha256.items()},
    )


def _check_disjoint_ids(groups: list[list[VqaExample]], paths: list) -> None:
    seen: dict[str, int] = {}
    for i, examples in enumerate(groups):
        for ex in examples:
            if seen.setdefault(ex.id, i) != i:
                raise ValueError(f"{paths[i]} and {paths[seen[ex.id]]} share example id {ex.id!r}: one file listed twice?")


def _read_rows(text: str, path: Path) -> list[tuple[int, object]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise MalformedRowError(f"{path.name} is not valid JSON: {e}") from e
        return list(enumerate(items, 1))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((n, f"invalid JSON: {e}"))
    return rows


def _polarity_from_name(path: Path) -> str | None:
    name = path.name.lower()
    is_neg = "negative" in name
    is_pos = "positive" in name or "postive" in name  # MedHallTune spells its prediction file "postive"
    return ("negative" if is_neg else "positive") if is_neg != is_pos else None


def _file_kind(rows: list[tuple[int, object]]) -> str:
    """The kind most rows have, so one bad first row cannot turn a whole file into another kind."""
    kinds = Counter(_row_kind(obj) for _, obj in rows if isinstance(obj, dict))
    return kinds.most_common(1)[0][0] if kinds else "val"


def _row_kind(obj: dict) -> str:
    return "llava" if "conversations" in obj else "pred" if "result" in obj else "val"


def _parse_rows(rows, path: Path, fallback_polarity: str | None, strict: bool) -> tuple[list[VqaExample], list[str]]:
    parse = {"val": _val_examples, "pred": _pred_examples, "llava": _llava_examples}[_file_kind(rows)]
    examples: list[VqaExample] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    for n, obj in rows:
        new, note = _parse_row(parse, obj, _row_polarity(obj, fallback_polarity, path, n), path, seen_ids)
        if note:
            message = f"{path.name} row {n}: {note}"
            if strict:
                raise MalformedRowError(message + " (strict mode; without it such rows are skipped and counted)")
            problems.append(message)
        examples.extend(new)
    return examples, problems


def _parse_row(parse, obj, polarity: str, path: Path, seen_ids: set[str]) -> tuple[list[VqaExample], str | None]:
    """(examples, None) for a good row; ([], why) for a bad one; (examples, why) when kept incomplete."""
    try:
        if not isinstance(obj, dict):
            raise ValueError(obj if isinstance(obj, str) else f"expected a JSON object, got {type(obj).__name__}")
        new, note = parse(obj, polarity, path)
    except KeyError as e:
        return [], f"missing field {e.args[0]!r}"
    except (ValueError, TypeError, AttributeError) as e:
        return [], str(e)
    dup = next((ex.id for ex in new if ex.id in seen_ids), None)
    if dup is not None:
        return [], f"duplicate id {dup!r}"
    seen_ids.update(ex.id for ex in new)
    return new, note


def _row_polarity(obj, fallback: str | None, path: Path, n: int) -> str | None:
    """The row's own `polarity` key, else the fallback; a bad key value is left for VqaExample to reject."""
    if not isinstance(obj, dict):
        return fallback  # the row is rejected as malformed anyway
    if "polarity" in obj:
        return obj["polarity"]
    if fallback is None:
        raise PolarityError(
            f"{path.name} row {n} has no `polarity` key and the file name says neither 'positive' nor 'negative': "
            "pass polarity='positive' or polarity='negative' explicitly"
        )
    return fallback


def clean_question(text: str) -> str:
    """The question without "<image>" markers and surrounding whitespace."""
    return text.replace(_IMAGE_MARKER, "").strip()


def _extra(obj: dict, known: frozenset) -> dict:
    return {k: v for k, v in obj.items() if k not in known}


def _val_examples(obj: dict, polarity: str, path: Path) -> tuple[list[VqaExample], str | None]:
    source = f"medhalltune-val-{polarity}"
    ex = VqaExample(
        id=f"{source}:{obj['question_id']}", image=obj["image"], image_path=None,
        question=clean_question(obj["text"]), answer=obj["gpt4_answer"], polarity=polarity, source=source,
        caption=obj.get("fig_caption"), meta=_extra(obj, _VAL_KEYS),
    )
    return [ex], None


def _pred_examples(obj: dict, polarity: str, path: Path) -> tuple[list[VqaExample], str | None]:
    question = clean_question(obj["text"])
    if question != obj["question"].strip():
        raise ValueError(f"`question` {obj['question']!r} disagrees with `text` {obj['text']!r}")
    scores, note = _scores_or_note(obj["result"])
    source = f"medhalltune-pred-{polarity}"
    ex = VqaExample(
        id=f"{source}:{obj['question_id']}", image=obj["image"], image_path=None,
        question=question, answer=obj["gpt4_answer"], polarity=polarity, source=source,
        model_answer=obj["answer"], scores=scores, caption=obj.get("fig_caption"), meta=_extra(obj, _PRED_KEYS),
    )
    return [ex], note


def _scores_or_note(result: str) -> tuple[tuple | None, str | None]:
    """Scores kept None (the row stays, noted as malformed) when they cannot be parsed."""
    try:
        return parse_scores(result), None
    except ValueError as e:
        return None, f"scores unreadable, kept with scores=None: {e}"


def parse_scores(result: str) -> tuple[float, float, float, float]:
    """GPT-4o's four scores from the first non-empty line of a `result` text.

    Takes the numbers on that line whatever separates them ("7 8 6 9",
    "7, 8, 6, 9", "Scores: 7/10 8/10 6/10 9/10"); raises ValueError unless
    there are exactly four, each from 1 to 10.
    """
    if not isinstance(result, str):
        raise ValueError(f"`result` must be a string, got {type(result).__name__}")
    line = next((ln for ln in result.splitlines() if ln.strip()), "")
    numbers = re.findall(r"\d+(?:\.\d+)?", re.sub(r"/\s*10\b", "", line))
    if len(numbers) != 4:
        raise ValueError(f"expected 4 scores on the first line of `result`, got {line[:60]!r}")
    scores = tuple(float(x) for x in numbers)
    if not all(1.0 <= s <= 10.0 for s in scores):
        raise ValueError(f"scores must be from 1 to 10, got {line[:60]!r}")
    return scores


def _llava_examples(obj: dict, polarity: str, path: Path) -> tuple[list[VqaExample], str | None]:
    source = obj.get("source") or f"llava-json:{path.stem}"
    pairs = _conversation_pairs(obj["conversations"])
    scores = obj.get("scores")
    if scores is not None and not isinstance(scores, list):
        raise ValueError(f"`scores` must be a list of 4 numbers, got {scores!r}")
    common = dict(
        image=obj["image"], image_path=None, polarity=polarity, source=source,
        model_answer=obj.get("model_answer"), scores=None if scores is None else tuple(float(s) for s in scores),
        caption=obj.get("caption"), meta=_extra(obj, _LLAVA_KEYS),
    )
    suffix = (lambda t: f":{t}") if len(pairs) > 1 else (lambda t: "")
    examples = [
        VqaExample(id=f"{source}:{obj['id']}{suffix(t)}", question=clean_question(q), answer=a, **common)
        for t, (q, a) in enumerate(pairs)
    ]
    return examples, None


def _conversation_pairs(turns: list) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise ValueError("`conversations` must be a non-empty list of human/gpt pairs")
    pairs = []
    for human, gpt in zip(turns[0::2], turns[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"`conversations` must alternate human/gpt, got {human.get('from')!r}, {gpt.get('from')!r}")
        pairs.append((human["value"], gpt["value"]))
    return pairs


# ---------------------------------------------------------------- images


def _resolve_images(
    examples: list[VqaExample], image_dir: str | Path | None, allow_missing: bool
) -> tuple[list[VqaExample], int]:
    found = _existing_images({ex.image for ex in examples}, image_dir)
    resolved = [_with_image_path(ex, found.get(ex.image)) for ex in examples]
    missing = [ex for ex in resolved if ex.image_path is None]
    if missing and not allow_missing:
        raise MissingImagesError(_missing_message(missing, len(resolved), image_dir))
    return resolved, len(missing)


def _existing_images(names: set[str], image_dir: str | Path | None) -> dict[str, Path]:
    if image_dir is None:
        return {}
    root = Path(image_dir)
    return {name: root / name for name in names if (root / name).is_file()}


def _with_image_path(ex: VqaExample, image_path: Path | None) -> VqaExample:
    return ex if ex.image_path == image_path else replace(ex, image_path=image_path)


def _missing_message(missing: list[VqaExample], total: int, image_dir) -> str:
    images = sorted({ex.image for ex in missing})
    if image_dir is None:
        where = "(no image folder was given)"
    else:
        where = f"under {image_dir}" + ("" if Path(image_dir).is_dir() else " (no such folder)")
    return (
        f"{len(missing)} of {total} rows ({len(images)} images, e.g. {images[0]!r}) have no image file {where}. "
        "Point at the folder that holds them with --image-dir DIR (image_dir=...), or pass "
        "--allow-missing-images (allow_missing_images=True) to use a blank image in their place."
    )


def blank_image(size: int = 64):
    """A mid-gray RGB PIL image, the stand-in for a missing image file (see BLANK_IMAGE_NOTE)."""
    if size <= 0:
        raise ValueError(f"`size` must be positive, got {size}")
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


def image_payload(example: VqaExample, blank_size: int = 64) -> tuple[bytes, str]:
    """-> (image bytes, media type) for a row: its file, or a blank PNG when the file is missing."""
    if example.image_path is not None:
        from guard.preprocess import media_type_for

        return example.image_path.read_bytes(), media_type_for(example.image_path)
    return _blank_png(blank_size), "image/png"


@functools.lru_cache(maxsize=4)
def _blank_png(size: int) -> bytes:
    """The blank stand-in as PNG bytes, encoded once per size (a split without images has thousands of rows)."""
    import io

    buf = io.BytesIO()
    blank_image(size).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- splitting and mixing


def split_by_image(
    examples: list[VqaExample], fractions: dict[str, float] | None = None, seed: int = 0
) -> dict[str, list[VqaExample]]:
    """Split examples so that all questions of one image land in the same part.

    Each image goes to a part by a SHA-256 hash of (seed, image name), so the
    assignment is stable across runs and does not depend on which other images
    are loaded; part sizes therefore match `fractions` only approximately.
    Examples keep their input order within a part.
    """
    fractions = {"train": 0.8, "heldout": 0.2} if fractions is None else fractions
    _check_fractions(fractions)
    parts: dict[str, list[VqaExample]] = {name: [] for name in fractions}
    for ex in examples:
        parts[_part_of(ex.image, fractions, seed)].append(ex)
    return parts


def _check_fractions(fractions: dict[str, float]) -> None:
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"`fractions` must be a non-empty dict of positive numbers, got {fractions!r}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"`fractions` must sum to 1, got {sum(fractions.values())}")


def _part_of(image: str, fractions: dict[str, float], seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{image}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return name
    return name  # float rounding left u just above the last boundary


def mix(datasets: list[tuple[list[VqaExample], float]], n: int, seed: int = 0) -> list[VqaExample]:
    """`n` examples drawn from the sources in proportion to their weights, shuffled.

    Source counts are the weights' shares of `n` (largest remainder). A source
    smaller than its count k repeats: each of its examples appears k // len or
    one more times; otherwise it gives k distinct examples.
    """
    if n < 0:
        raise ValueError(f"`n` must be non-negative, got {n}")
    weights = [float(w) for _, w in datasets]
    if not datasets or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    rng = random.Random(seed)
    counts = _shares(weights, n)
    picked = [ex for (examples, _), k in zip(datasets, counts) for ex in _draw(examples, k, rng)]
    rng.shuffle(picked)
    return picked


def group_by_length(lengths: list[int], batch_size: int, seed: int = 0, window: int = 50) -> list[int]:
    """A training order (a permutation of `range(len(lengths))`) whose consecutive batches of
    `batch_size` hold examples of similar length, so that little of each batch is padding.

    Each run of `window` batches is sorted by length and cut into batches; the batches are
    then shuffled (seeded), so that long batches do not follow the order of the data. The
    order depends only on the lengths and the seed: a resumed run sees the same batches.
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"`batch_size` and `window` must be at least 1, got {batch_size} and {window}")
    span = batch_size * window
    batches = []
    for start in range(0, len(lengths), span):
        chunk = sorted(range(start, min(start + span, len(lengths))), key=lambda i: (lengths[i], i))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    random.Random(seed).shuffle(batches)
    return [i for b in batches for i in b]


def _shares(weights: list[float], n: int) -> list[int]:
    exact = [n * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(examples: list[VqaExample], k: int, rng: random.Random) -> list[VqaExample]:
    if k and not examples:
        raise ValueError("a source with a positive weight has no examples")
    copies, rest = divmod(k, len(examples)) if examples else (0, 0)
    return list(examples) * copies + rng.sample(examples, rest)


# ---------------------------------------------------------------- writing


def write_llava_json(examples: Iterable[VqaExample], path: str | Path) -> Path:
    """Write examples as a LLaVA-style instruction JSON list, one single-turn item per example.

    `load_examples` on the written file gives the same examples back (with the
    same image folder): each item keeps `source`, `polarity`, `scores`,
    `model_answer`, `caption` and the `meta` keys at its top level.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = [_llava_item(ex) for ex in examples]
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _llava_item(ex: VqaExample) -> dict:
    clash = _LLAVA_KEYS & ex.meta.keys()
    if clash:
        raise ValueError(f"{ex.id}: `meta` keys {sorted(clash)} clash with LLaVA item keys")
    item = {
        "id": ex.question_id, "source": ex.source, "image": ex.image, "polarity": ex.polarity,
        "conversations": [
            {"from": "human", "value": f"{_IMAGE_MARKER}\n{ex.question}"},
            {"from": "gpt", "value": ex.answer},
        ],
    }
    optional = {"model_answer": ex.model_answer, "scores": ex.scores and list(ex.scores), "caption": ex.caption}
    item.update({k: v for k, v in optional.items() if v is not None})
    return {**item, **ex.meta}


def write_predictions(pairs: Iterable[tuple[VqaExample, str]], path: str | Path) -> Path:
    """Write (example, predicted answer) pairs in MedHallTune's upload format.

    One JSON object per line with exactly `question_id`, `image`, `question`
    and `answer`. The leaderboard takes one file per polarity, so a repeated
    question_id (e.g. positive and negative rows in one file) is an error.
    """
    lines, seen = [], set()
    for ex, answer in pairs:
        if not isinstance(answer, str):
            raise ValueError(f"{ex.id}: the predicted answer must be a string, got {type(answer).__name__}")
        if ex.question_id in seen:
            raise ValueError(f"question_id {ex.question_id!r} repeats: write each polarity to a file of its own")
        seen.add(ex.question_id)
        row = {"question_id": ex.question_id, "image": ex.image, "question": ex.question, "answer": answer}
        lines.append(json.dumps(row) + "\n")
    path = Path(path)
    path.write_text("".join(lines), encoding="utf-8")
    return path
