"""Fine-tuning: a Hugging Face VLM directory + MedHallTune-format data -> a tuned model directory.

LoRA (peft, on the text model's attention projections) or full fine-tuning,
driven by Hugging Face accelerate, so the same command runs on one CPU, one
GPU, or under `accelerate launch` with several processes (data parallel).
Checkpoints are accelerate states; a rerun with the same output directory
resumes from the newest one. The output is a model directory the runtime can
serve (merged weights), or a peft adapter when LoRA is not merged.

Guard heads are not fitted here: `training/heads.py` does that on the tuned
model's own hidden states. The output gets fresh untrained heads, so a tuned
model never serves with heads fitted to other weights.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from guard.families import family_for
from guard.head import GuardHeads
from guard.preprocess import preprocess
from guard.prompt import Prompter
from guard.spec import HEADS_FILE, META_FILE, spec_from_hf_dir
from training.data import BLANK_IMAGE_NOTE, VqaExample, blank_image, load_examples, mix

_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
               "chat_template.json", "chat_template.jinja")
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom"}


@dataclass(frozen=True)
class DataSource:
    path: str
    """A MedHallTune-format file: validation/prediction JSONL or LLaVA-style JSON."""
    weight: float = 1.0
    """Relative share of training samples drawn from this source."""
    image_dir: str | None = None
    """Folder its image names resolve against (default: the file's folder, then its `images/`)."""

    @classmethod
    def parse(cls, spec: str) -> "DataSource":
        """`PATH[:WEIGHT[:IMAGE_DIR]]`."""
        path, _, rest = spec.partition(":")
        weight, _, image_dir = rest.partition(":")
        return cls(path, float(weight) if weight else 1.0, image_dir or None)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    """Input model directory (Hugging Face save_pretrained layout, e.g. from `init-model`)."""
    out: str
    """Output directory; rerunning with the same one resumes from its newest checkpoint."""
    data: tuple[DataSource, ...]
    """Training sources, mixed by weight."""
    mode: str = "lora"
    """`lora` (peft adapters on the text model's attention) or `full` (every weight)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per step per process."""
    lr: float = 2e-4
    """Peak learning rate (cosine decay after a linear warm-up)."""
    warmup_steps: int = 20
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_answer_tokens: int = 96
    """Longer reference answers are cut to this many tokens."""
    allow_missing_images: bool = False
    """Train rows whose image file is missing on a blank image (and say so in the record)."""
    positive_only: bool = False
    """Drop hallucination-inducing (negative) questions: the "before tuning" baseline recipe."""
    merge: bool = True
    """LoRA: merge adapters into the weights so the output serves as is; otherwise save the adapter only."""
    checkpoint_every: int = 100
    """Save an accelerate checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    seed: int = 0
    model_id: str | None = None
    """Id written to medhallguard.json (default: the output directory's name)."""
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise ValueError(f"`mode` must be lora or full, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("`steps` and `batch_size` must be at least 1")
        if not self.data:
            raise ValueError("`data` is empty: give at least one MedHallTune-format file")
        if not 0 <= self.warmup_steps < self.steps + 1:
            raise ValueError("`warmup_steps` must be between 0 and `steps`")


# --- data -------------------------------------------------------------------


def load_training_examples(cfg: TrainConfig) -> tuple[list[VqaExample], dict]:
    """Load, filter and mix the sources; -> (examples in training order, data record)."""
    parts, record = [], {"sources": [], "notes": []}
    for src in cfg.data:
        image_dir = src.image_dir or _default_image_dir(Path(src.path))
        ds = load_examples(src.path, image_dir, allow_missing_images=cfg.allow_missing_images)
        examples = [e for e in ds.examples if not (cfg.positive_only and e.polarity == "negative")]
        if not examples:
            raise ValueError(f"{src.path} has no usable examples (positive_only={cfg.positive_only})")
        parts.append((examples, src.weight))
        record["sources"].append({"path": src.path, "weight": src.weight, "sha256": ds.sha256, "rows": len(examples),
                                  "polarity": ds.by_polarity(), "missing_images": ds.missing_images})
        if ds.missing_images:
            record["notes"].append(f"{src.path}: {ds.missing_images} rows without images. {BLANK_IMAGE_NOTE}")
    return parts, record


def _default_image_dir(path: Path) -> Path:
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


class EncodedExamples:
    """VqaExample -> (input_ids, labels, pixels): the prompt exactly as the runtime builds it."""

    def __init__(self, examples: list[VqaExample], prompter: Prompter, max_answer_tokens: int):
        self.examples, self.prompter, self.max_answer_tokens = examples, prompter, max_answer_tokens
        self._pixels: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        prompt = self.prompter.encode_prompt(ex.question).tolist()
        eos = self.prompter.spec.eos_token_ids[0]
        answer = self.prompter.encode_answer(ex.answer)[: self.max_answer_tokens] + [eos]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "pixels": self.pixels(ex)}

    def pixels(self, ex: VqaExample):
        key = str(ex.image_path) if ex.image_path else "<blank>"
        if key not in self._pixels:  # images repeat across questions: decode each once
            self._pixels[key] = image_pixels(ex, self.prompter.spec.preprocess)
        return self._pixels[key]


def image_pixels(ex: VqaExample, preprocess_config):
    """-> float32 [3, S, S]; a blank image when the row has no image file."""
    import io

    if ex.image_path is None:
        buf = io.BytesIO()
        blank_image(preprocess_config.image_size).save(buf, format="PNG")
        return preprocess(buf.getvalue(), "image/png", preprocess_config)
    media_type = _MEDIA_TYPES.get(ex.image_path.suffix.lower())
    if media_type is None:
        raise ValueError(f"{ex.image_path}: unsupported image suffix; use .png, .jpg or .dcm")
    return preprocess(ex.image_path.read_bytes(), media_type, preprocess_config)


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sequence. -> input_ids/labels/attention_mask [B, S], pixels [B, 3, H, W]."""
    import numpy as np
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n] = torch.tensor(b["input_ids"])
        labels[row, :n] = torch.tensor(b["labels"])
        mask[row, :n] = 1
    pixels = torch.from_numpy(np.stack([b["pixels"] for b in batch]))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixels": pixels}


# --- the loop ---------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Fine-tune; -> the output directory. Resumes from `cfg.out`'s newest checkpoint."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from guard.backends.torch_backend import load_model

    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    out = Path(cfg.out)
    spec = spec_from_hf_dir(cfg.model)
    family = family_for(json.loads((Path(cfg.model) / "config.json").read_text())["model_type"])
    prompter = Prompter(Path(cfg.model) / "tokenizer.json", spec)

    # 1) Data: a fixed, seeded order of exactly steps * batch * processes examples.
    parts, data_record = load_training_examples(cfg)
    for note in data_record["notes"]:
        acc.print(note)
    examples = mix(parts, cfg.steps * cfg.batch_size * acc.num_processes, seed=cfg.seed)
    pad_id = spec.eos_token_ids[0]  # padded positions are masked out of attention and loss
    loader = DataLoader(EncodedExamples(examples, prompter, cfg.max_answer_tokens), batch_size=cfg.batch_size,
                        shuffle=False, collate_fn=lambda b: collate(b, pad_id))

    # 2) Model, optimizer, schedule.
    model = _trainable(load_model(cfg.model), cfg, family)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)

    # 3) Resume where an interrupted run stopped.
    step = _resume(acc, out)
    batches = acc.skip_first_batches(loader, step) if step else loader
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step",
               disable=not (cfg.show_progress and acc.is_local_main_process))
    model.train()
    ema, t_start, step_times = None, time.perf_counter(), []
    try:
        for batch in batches:
            t = time.perf_counter()
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], **family.pixel_kwargs(batch["pixels"])).loss
            acc.backward(loss)
            acc.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            step_times.append(time.perf_counter() - t)
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", ex_s=f"{cfg.batch_size * acc.num_processes / step_times[-1]:.1f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _checkpoint(acc, out, step, cfg.keep_checkpoints)
            if step >= cfg.steps:
                break
    except KeyboardInterrupt:
        _checkpoint(acc, out, step, cfg.keep_checkpoints)
        acc.print(f"interrupted: saved a checkpoint at step {step}; rerun the same command to resume")
        raise
    finally:
        bar.close()

    # 4) Save a servable model directory and the run's record.
    acc.wait_for_everyone()
    if acc.is_main_process:
        _save(acc.unwrap_model(model), cfg, out)
        _write_record(out, cfg, data_record, {
            "final_loss_ema": ema,
            "steps_this_run": len(step_times),
            "step_time_s_median": sorted(step_times)[len(step_times) // 2] if step_times else None,
            "wall_s": time.perf_counter() - t_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "num_processes": acc.num_processes,
            "trainable_params": sum(p.numel() for p in params),
        })
    acc.wait_for_everyone()
    return out


def _trainable(model, cfg: TrainConfig, family):
    if cfg.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=family.LORA_TARGETS)
    return get_peft_model(model, lora)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def _checkpoint(acc, out: Path, step: int, keep: int) -> None:
    path = out / "checkpoints" / f"step-{step:07d}"
    acc.save_state(str(path))
    if acc.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _resume(acc, out: Path) -> int:
    done = [c for c in _checkpoints(out) if (c / "trainer_state.json").is_file()]
    if not done:
        return 0
    acc.load_state(str(done[-1]))
    step = json.loads((done[-1] / "trainer_state.json").read_text())["step"]
    acc.print(f"resuming from {done[-1]} (step {step})")
    return step


def _save(model, cfg: TrainConfig, out: Path) -> None:
    src = Path(cfg.model)
    if cfg.mode == "lora" and not cfg.merge:
        model.save_pretrained(out / "adapter")
        return
    if cfg.mode == "lora":
        model = model.merge_and_unload()
    model.save_pretrained(out)
    for name in _COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    meta = json.loads((src / META_FILE).read_text()) if (src / META_FILE).is_file() else {}
    meta.update(model_id=cfg.model_id or out.name, trained=True, base_model=str(src), created_by="medhallguard train")
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    GuardHeads.random(model.config.text_config.hidden_size, seed=cfg.seed).save(out / HEADS_FILE)


def library_versions() -> dict:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "accelerate", "tokenizers", "numpy", "safetensors")
    versions = {}
    for n in names:
        try:
            versions[n] = md.version(n)
        except md.PackageNotFoundError:
            versions[n] = None
    return {**versions, "python": platform.python_version(), "machine": platform.machine()}


def _write_record(out: Path, cfg: TrainConfig, data_record: dict, run: dict) -> None:
    record = {"config": asdict(cfg), "data": data_record, "libraries": library_versions(), "run": run}
    (out / "train_record.json").write_text(json.dumps(record, indent=2, default=str))
