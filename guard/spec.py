"""ModelSpec: everything the runtime must know about a model, read without torch.

A Hugging Face `save_pretrained` directory is described by its `config.json`,
`tokenizer.json`, `preprocessor_config.json` and (optionally) our own
`medhallguard.json`. An export bundle carries the same spec in its manifest, so
every backend and the runtime agree on token ids, layer indices and
preprocessing constants.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from guard.errors import ModelLoadError
from guard.families import family_for
from guard.preprocess import PreprocessConfig

META_FILE = "medhallguard.json"
HEADS_FILE = "guard_heads.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    family: str
    model_id: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    mid_layer: int
    """Hidden-state index the guard reads besides the last (0 = embeddings, L = last layer)."""
    image_token_id: int
    num_image_tokens: int
    image_text: str
    """The prompt text that stands for one image (placeholder tokens included)."""
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    prompt_template: str
    """Has `{image}` and `{question}` fields; the answer follows it."""
    answer_prefix: str
    preprocess: PreprocessConfig

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; a model directory needs it (is this a save_pretrained directory?)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def spec_from_hf_dir(model_dir: str | Path) -> ModelSpec:
    """Read a Hugging Face VLM directory into a ModelSpec (no torch, no transformers)."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist; pass the folder written by save_pretrained")
    config = _read_json(model_dir / "config.json")
    meta = _read_json(model_dir / META_FILE) if (model_dir / META_FILE).is_file() else {}
    family = family_for(config.get("model_type", "?"))
    text = config["text_config"]
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelLoadError(f"{tok_path} is missing; save the model's fast tokenizer with save_pretrained")
    tok = Tokenizer.from_file(str(tok_path))

    def token_id(token: str) -> int:
        tid = tok.token_to_id(token)
        if tid is None:
            raise ModelLoadError(f"token {token!r} is not in {tok_path}; the tokenizer does not match family {family.NAME}")
        return tid

    num_layers = text["num_hidden_layers"]
    bos = meta.get("bos_token", None)
    template = meta.get("prompt_template", family.PROMPT_TEMPLATE)
    try:
        from guard.prompt import template_parts

        template_parts(template)
    except ValueError as exc:
        raise ModelLoadError(f"{model_dir / META_FILE}: `prompt_template`: {exc}") from exc
    return ModelSpec(
        family=family.NAME,
        model_id=meta.get("model_id", model_dir.name),
        num_layers=num_layers,
        hidden_size=text["hidden_size"],
        vocab_size=text["vocab_size"],
        mid_layer=meta.get("mid_layer", num_layers // 2),
        image_token_id=token_id(family.IMAGE_TOKEN),
        num_image_tokens=family.num_image_tokens(config),
        image_text=family.image_text(config),
        eos_token_ids=tuple(token_id(t) for t in meta.get("eos_tokens", family.EOS_TOKENS)),
        bos_token_id=token_id(bos) if bos else None,
        prompt_template=template,
        answer_prefix=meta.get("answer_prefix", family.ANSWER_PREFIX),
        preprocess=_preprocess(model_dir, meta),
    )


def _preprocess(model_dir: Path, meta: dict) -> PreprocessConfig:
    """The HF processor's constants, with the input channels the model was trained on (medhallguard.json)."""
    cfg = PreprocessConfig.from_hf(_read_json(model_dir / "preprocessor_config.json"))
    try:
        return replace(cfg, channels=meta.get("image_channels", "rgb"))
    except ValueError as exc:
        raise ModelLoadError(f"{model_dir / META_FILE}: `image_channels`: {exc}") from exc


def dir_checksum(model_dir: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> str:
    """sha256 over the weight and config files of a directory, in name order."""
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in Path(model_dir).glob(pat) if p.is_file()})
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
