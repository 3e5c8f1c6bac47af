"""`medhallguard init-model`: a random-init VLM from a config, for tests and plumbing.

It writes a complete Hugging Face `save_pretrained` directory (config, weights,
a byte-level BPE tokenizer trained offline here, the image processor config)
plus random guard heads marked untrained. Its answers mean nothing until it
is trained; the policy abstains on it unless `allow_untrained_heads` is set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from guard.families import family_for
from guard.head import GuardHeads
from guard.preprocess import CHANNELS
from guard.spec import HEADS_FILE, META_FILE

# Presets as plain data (gpt-fast's transformer_configs). "256m" has the shape of SmolVLM-256M.
VISION = {
    "nano": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=4),
    "256m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16),
}
TEXT = {
    "nano": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0),
    "256m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, vocab_size=49280),
}
SCALE_FACTOR = {"nano": 4, "256m": 4}  # nano: 16x16 patches of 4 px -> 16 image tokens
# LLaVA has no pixel shuffle: every patch is an image token, so its nano tower uses 8 px patches (64 tokens).
LLAVA_PATCH = {"nano": 8, "256m": 16}
TOKENIZER_VOCAB = {"nano": 2048, "256m": 8192}
SPECIAL_TOKENS = {
    "smolvlm": ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"],
    "llava": ["<unk>", "<s>", "</s>", "<image>"],
}
FAMILIES = ("smolvlm", "llava")
SIZES = ("nano", "256m")

# A small built-in corpus so the tokenizer knows the domain even with no data at hand.
_SEED_CORPUS = """
What abnormality is seen in the chest radiograph? The image shows a nodule in the right upper zone.
Is there a pleural effusion on the left side? No, there is no pleural effusion visible in this image.
The axial CT slice shows a mass in the left lung measuring about 25 mm. There is no pneumothorax.
Which organ is shown in this MRI scan? Is there a fracture line in the rib? Calcification, consolidation,
cardiomegaly, atelectasis, edema, hemorrhage, lesion, tumor, lymph node, liver, kidney, spleen, brain.
The arrow points to a hypodense lesion. There is no arrow or annotation in this image.
"""


def default_corpus_files() -> list[Path]:
    """MedHallTune text beside the repo (../shared/data/medhalltune), when it is there."""
    from training.data import DEFAULT_MEDHALLTUNE_DIR as root

    return sorted(root.glob("val_*_qa-filtered.jsonl")) if root.is_dir() else []


def _corpus(files: list[Path]) -> list[str]:
    """Question and answer text from MedHallTune JSONL or LLaVA-style JSON files."""
    lines = [line for line in _SEED_CORPUS.strip().splitlines()]
    for path in files:
        text = path.read_text()
        if text.lstrip().startswith("["):  # LLaVA-style instruction JSON
            for item in json.loads(text):
                lines += [turn["value"].replace("<image>", "") for turn in item.get("conversations", [])]
            continue
        for row in text.splitlines():
            rec = json.loads(row)
            lines.append(rec.get("text", "").replace("<image>", ""))
            lines.append(rec.get("gpt4_answer", ""))
    return lines


def train_tokenizer(family: str, vocab_size: int, corpus_files: list[Path], split_digits: bool = False):
    """A byte-level BPE with the family's special tokens -> PreTrainedTokenizerFast. `split_digits`:
    every digit is its own token, as in SmolLM's tokenizer (a Digits pre-tokenizer before the byte
    level), so "23 mm" is "2", "3", " mm" and a size is spelt out digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(corpus_files), trainer)
    names = {"smolvlm": dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"),
             "llava": dict(bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>")}[family]
    # model_input_names: a bare BPE would also return token_type_ids, which generate() rejects (FINDINGS).
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"],
                                   extra_special_tokens={"image_token": "<image>"}, **names)


def build_config(family: str, size: str, tokenizer, text_overrides: dict | None = None):
    from transformers import CLIPVisionConfig, Idefics3Config, LlamaConfig, LlavaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    text = {**TEXT[size], **(text_overrides or {})}
    text.setdefault("vocab_size", len(tokenizer))
    text = LlamaConfig(**text, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if family == "smolvlm":
        return Idefics3Config(vision_config=Idefics3VisionConfig(**VISION[size]).to_dict(), text_config=text.to_dict(),
                              scale_factor=SCALE_FACTOR[size], image_token_id=image_token_id, tie_word_embeddings=True)
    vision = {**VISION[size], "patch_size": LLAVA_PATCH[size]}
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision).to_dict(), text_config=text.to_dict(),
                       image_token_index=image_token_id, image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
                       tie_word_embeddings=True)


def image_processor_config(family: str, size: str) -> dict:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    px = VISION[size]["image_size"]
    if family == "smolvlm":
        proc = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": px}, max_image_size={"longest_edge": px})
    else:
        proc = CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    return json.loads(proc.to_json_string())


def init_model(family: str, size: str, out_dir: str | Path, seed: int = 0, corpus_files: list[Path] | None = None,
               image_channels: str = "rgb", text_overrides: dict | None = None, question_first: bool = False,
               split_digits: bool = False) -> Path:
    """Write a random-init model directory; atomic: a temp dir renamed into place. `image_channels`
    (`guard.preprocess.CHANNELS`) is what its three input channels hold, kept in medhallguard.json;
    `text_overrides` replaces fields of the size's text config (`TEXT`), e.g. num_key_value_heads;
    `question_first` keeps the family's QUESTION_FIRST_TEMPLATE as its prompt template (the question
    before the image and again after it, `guard.prompt.template_parts`); `split_digits` makes every
    digit a token of its own (`train_tokenizer`)."""
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {SIZES}, got {size!r}")
    if image_channels not in CHANNELS:
        raise ValueError(f"`image_channels` must be one of {CHANNELS}, got {image_channels!r}")
    unknown = set(text_overrides or {}) - set(TEXT[size])
    if unknown:
        raise ValueError(f"`text_overrides` {sorted(unknown)}: not text-config fields of size {size} ({', '.join(TEXT[size])})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    files = default_corpus_files() if corpus_files is None else corpus_files
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer(family, TOKENIZER_VOCAB[size], files, split_digits=split_digits)
        tokenizer.save_pretrained(tmp)
        torch.manual_seed(seed)
        config = build_config(family, size, tokenizer, text_overrides)
        model = AutoModelForImageTextToText.from_config(config)
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(image_processor_config(family, size), indent=2))
        corpus_hash = hashlib.sha256("\n".join(_corpus(files)).encode()).hexdigest()
        meta = {
            "model_id": f"medhallguard-{family}-{size}-init",
            "created_by": "medhallguard init-model",
            "trained": False,
            "seed": seed,
            "tokenizer_corpus": [p.name for p in files],
            "tokenizer_corpus_sha256": corpus_hash,
        }
        if family == "llava":
            meta["bos_token"] = "<s>"
        if image_channels != "rgb":
            meta["image_channels"] = image_channels
        if question_first:
            meta["prompt_template"] = family_for(family).QUESTION_FIRST_TEMPLATE
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        GuardHeads.random(config.text_config.hidden_size, seed=seed).save(tmp / HEADS_FILE)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "init-model",
        help="write a random-init model directory (for tests and plumbing; its answers mean nothing)",
        description=__doc__,
        epilog="example: medhallguard init-model --family smolvlm --size nano /tmp/nano-smolvlm",
    )
    p.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    p.add_argument("--family", choices=FAMILIES, default="smolvlm", help="model family (default: smolvlm)")
    p.add_argument("--size", choices=SIZES, default="nano", help="nano: tiny, for tests; 256m: the shape of SmolVLM-256M")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and heads (default: 0)")
    p.add_argument("--image-channels", choices=CHANNELS, default="rgb",
                   help="what the 3 input channels hold: rgb (default), or lesion-enhance (luma, white top-hat, "
                        "difference of Gaussians), for small findings in greyscale images")
    p.add_argument("--question-first", action="store_true",
                   help="prompt with the question before the image as well as after it, so that the image "
                        "tokens see the question (kept in medhallguard.json)")
    p.add_argument("--split-digits", action="store_true",
                   help="make every digit a token of its own, as SmolLM's tokenizer does (\"23 mm\" -> 2, 3, mm)")
    p.add_argument("--corpus", type=Path, nargs="*", default=None,
                   help="JSONL files (MedHallTune format) to train the tokenizer on; default: ../shared/data/medhalltune")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = init_model(args.family, args.size, args.out_dir, seed=args.seed, corpus_files=args.corpus,
                     image_channels=args.image_channels, question_first=args.question_first,
                     split_digits=args.split_digits)
    print(f"wrote {out} (random init: answers mean nothing until trained)")
    return 0
