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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from guard.decode import question_start
from guard.families import family_for
from guard.head import GuardHeads
from guard.preprocess import preprocess
from guard.prompt import Prompter
from guard.spec import HEADS_FILE, META_FILE, spec_from_hf_dir
from training.data import BLANK_IMAGE_NOTE, POLARITIES, VqaExample, group_by_length, image_payload, load_examples, mix
from training.features import fill_image_slots

_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
               "chat_template.json", "chat_template.jinja")


@dataclass(frozen=True)
class DataSource:
    path: str
    """A MedHallTune-format file: validation/prediction JSONL or LLaVA-style JSON."""
    weight: float = 1.0
    """Relative share of training samples drawn from this source."""
    image_dir: str | None = None
    """Folder its image names resolve against (default: the file's folder, then its `images/`)."""
    polarity: str | None = None
    """Draw only the file's "positive" or only its "negative" rows (None: all of them), so that one file
    can be two sources with their own weights, e.g. more positive questions in a tuned mix."""

    def __post_init__(self):
        if self.polarity not in (None, *POLARITIES):
            raise ValueError(f"{self.path}: polarity must be one of {', '.join(POLARITIES)} or unset, "
                             f"got {self.polarity!r}")
        if self.weight < 0:
            raise ValueError(f"{self.path}: weight must be >= 0, got {self.weight}")

    @classmethod
    def parse(cls, spec: str) -> "DataSource":
        """`PATH[:WEIGHT[:IMAGE_DIR[:POLARITY]]]` (an empty IMAGE_DIR keeps the default)."""
        path, _, rest = spec.partition(":")
        weight, _, rest = rest.partition(":")
        image_dir, _, polarity = rest.partition(":")
        try:
            weight_value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"data source {spec!r}: WEIGHT must be a number, got {weight!r}") from None
        return cls(path, weight_value, image_dir or None, polarity or None)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    """Input model directory (Hugging Face save_pretrained layout, e.g. from `init-model`)."""
    out: str
    """Output directory; rerunning with the same one resumes from its newest checkpoint."""
    data: tuple[DataSource, ...]
    """Training sources, mixed by weight."""
    eval_data: tuple[DataSource, ...] = ()
    """Held-out sources for a validation loss (rows not trained on, e.g. another split); none: no validation."""
    eval_every: int = 0
    """Steps between validation losses (0: only at the end). Each is shown on the progress bar and
    kept in train_record.json's `run.eval_loss`; the CLI prints them at the end."""
    eval_rows: int = 256
    """Validation rows: this many drawn from `eval_data` by weight (seeded, the same every time), or all
    of them if fewer."""
    mode: str = "lora"
    """`lora` (peft adapters on the text model's attention) or `full` (every weight)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per step per process."""
    lr: float = 2e-4
    """Peak learning rate (cosine decay after a linear warm-up)."""
    warmup_steps: int = 20
    """Linear warm-up steps (at most half of `steps`)."""
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_answer_tokens: int = 96
    """Longer reference answers are cut to this many tokens."""
    group_by_length: bool = False
    """Batch examples of similar token length together (`training.data.group_by_length`): less
    padding, so faster steps when sources differ in length (MedHallTune's long answers)."""
    allow_missing_images: bool = False
    """Train rows whose image file is missing on a blank image (and say so in the record)."""
    positive_only: bool = False
    """Drop hallucination-inducing (negative) questions: the "before tuning" baseline recipe."""
    question_lm: bool = False
    """Also train next-token prediction on the question's tokens (not only the answer's), so the
    question's hidden states, which the premise head reads, learn the question's own wording."""
    premise_loss_weight: float = 0.0
    """Weight of an auxiliary loss: a linear probe on the question's mean hidden states (the premise
    head's features) predicts whether the question is negative. It teaches the model to represent a
    false premise where the guard reads it; the probe itself is discarded (the heads are refit later)."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (full mode: the connector and text model still train), e.g.
    after `training.vision_pretrain`; LoRA never touches the tower."""
    freeze_connector: bool = False
    """Keep the connector (pixel shuffle and projection into the text model's input) fixed too: the text
    model alone learns to read the image tokens as the tower's pretraining left them. Measured on the
    default recipe (1,200 held-out positive questions, in process), a trained connector lost what the
    pretraining put in the tokens: with a tower pretrained with `VisionPretrainConfig.centre_weight`
    the text model answered side questions at 0.43, right for every left finding (positive accuracy
    0.693; fixed: 0.838), and on the default tower positive accuracy went from 0.856 to 0.867."""
    tower_cache_mb: float = 2048
    """With `freeze_vision`, keep up to this much of the fixed tower's outputs in memory so that each
    image goes through the tower once (`TowerCache`; one process, SmolVLM). 0 turns it off."""
    merge: bool = True
    """LoRA: merge adapters into the weights so the output serves as is; otherwise save the adapter only."""
    checkpoint_every: int = 100
    """Save an accelerate checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    seed: int = 0
    model_id: str | None = None
    """Id written to medhallguard.json (default: the output directory's name)."""
    show_progress: bool = True
    progress_position: int = 0
    """The progress bar's line on the terminal (`train_side_by_side` gives each run its own)."""

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise ValueError(f"`mode` must be lora or full, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("`steps` and `batch_size` must be at least 1")
        if not self.data:
            raise ValueError("`data` is empty: give at least one MedHallTune-format file")
        if self.eval_every < 0 or self.eval_rows < 1:
            raise ValueError("`eval_every` must be >= 0 and `eval_rows` >= 1")
        if self.warmup_steps < 0:
            raise ValueError("`warmup_steps` must be >= 0")
        if self.premise_loss_weight < 0:
            raise ValueError("`premise_loss_weight` must be >= 0")


# --- data -------------------------------------------------------------------


def load_training_examples(cfg: TrainConfig, sources: tuple[DataSource, ...] | None = None
                           ) -> tuple[list[tuple[list[VqaExample], float]], dict]:
    """Load and filter `sources` (default: the training data); -> ([(examples, weight)], data record)."""
    parts, record, loaded = [], {"sources": [], "notes": []}, {}
    for src in cfg.data if sources is None else sources:
        image_dir = src.image_dir or _default_image_dir(Path(src.path))
        if (src.path, image_dir) not in loaded:  # one file's two polarities are read and parsed once
            loaded[src.path, image_dir] = load_examples(src.path, image_dir, allow_missing_images=cfg.allow_missing_images)
        ds = loaded[src.path, image_dir]
        examples = [e for e in ds.examples if not (cfg.positive_only and e.polarity == "negative")
                    and src.polarity in (None, e.polarity)]
        if not examples:
            raise ValueError(f"{src.path} has no usable examples (positive_only={cfg.positive_only}, "
                             f"polarity={src.polarity})")
        parts.append((examples, src.weight))
        record["sources"].append({"path": src.path, "weight": src.weight, "polarity_filter": src.polarity,
                                  "sha256": ds.sha256, "rows": len(examples),
                                  "polarity": ds.by_polarity(), "missing_images": ds.missing_images})
        if ds.missing_images:
            record["notes"].append(f"{src.path}: {ds.missing_images} rows without images. {BLANK_IMAGE_NOTE}")
    return parts, record


def _default_image_dir(path: Path) -> Path:
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


class EncodedExamples:
    """VqaExample -> (input_ids, labels, pixels): the prompt exactly as the runtime builds it."""

    def __init__(self, examples: list[VqaExample], prompter: Prompter, max_answer_tokens: int,
                 question_lm: bool = False, cache_pixels: bool = True):
        self.examples, self.prompter, self.max_answer_tokens = examples, prompter, max_answer_tokens
        self.question_lm, self.cache_pixels = question_lm, cache_pixels
        self._pixels: dict[str, object] = {}
        self._encoded: dict[tuple[str, str], tuple] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        ids, labels, question = self._tokens(ex)
        return {"input_ids": ids, "labels": labels, "pixels": self.pixels(ex), "image": self.image_key(ex),
                "question": question, "negative": float(ex.polarity == "negative")}

    def length(self, i: int) -> int:
        """Tokens in example `i`'s training sequence (prompt, image tokens and answer)."""
        return len(self._tokens(self.examples[i])[0])

    def reorder(self, order: list[int]) -> None:
        """Serve the examples in `order` (a permutation of their indices)."""
        if sorted(order) != list(range(len(self.examples))):
            raise ValueError("`order` must be a permutation of the example indices")
        self.examples = [self.examples[i] for i in order]

    def _tokens(self, ex: VqaExample) -> tuple[list[int], list[int], tuple[int, int]]:
        key = (ex.question, ex.answer)
        if key not in self._encoded:  # questions repeat when a source is drawn more than once
            prompt = self.prompter.encode_prompt(ex.question).tolist()
            eos = self.prompter.spec.eos_token_ids[0]
            answer = self.prompter.encode_answer(ex.answer)[: self.max_answer_tokens] + [eos]
            start = question_start(np.array(prompt), self.prompter.spec.image_token_id)
            targets = [-100] * start + prompt[start:] if self.question_lm else [-100] * len(prompt)
            self._encoded[key] = (prompt + answer, targets + answer, (start, len(prompt)))
        return self._encoded[key]

    @staticmethod
    def image_key(ex: VqaExample) -> str:
        return str(ex.image_path) if ex.image_path else "<blank>"

    def pixels(self, ex: VqaExample):
        key = self.image_key(ex)
        if not self.cache_pixels:
            return image_pixels(ex, self.prompter.spec.preprocess)
        if key not in self._pixels:  # images repeat across questions: decode each once
            self._pixels[key] = image_pixels(ex, self.prompter.spec.preprocess)
        return self._pixels[key]


def image_pixels(ex: VqaExample, preprocess_config):
    """-> float32 [3, S, S]; a blank image when the row has no image file."""
    return preprocess(*image_payload(ex, preprocess_config.image_size), preprocess_config)


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sequence. -> input_ids/labels/attention_mask/question_mask [B, S],
    pixels [B, 3, H, W], negative [B] (1.0 for a negative question), images (each row's image key)."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    question = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n] = torch.tensor(b["input_ids"])
        labels[row, :n] = torch.tensor(b["labels"])
        mask[row, :n] = 1
        question[row, b["question"][0] : b["question"][1]] = 1.0
    pixels = torch.from_numpy(np.stack([b["pixels"] for b in batch]))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixels": pixels, "question_mask": question,
            "negative": torch.tensor([b["negative"] for b in batch]), "images": [b.get("image") for b in batch]}


class TowerCache:
    """A fixed vision tower's output per image, computed once and reused every time the image recurs.

    With `freeze_vision` the tower is a pure function of the pixels, so its forward pass on an
    image seen before is wasted work (for the default recipe, about a fifth of each step). The
    connector and text model still run, and train, on every step. Only SmolVLM (Idefics3) splits
    this way; images past `max_mb` of cached states are computed each time, not stored.
    """

    def __init__(self, model, max_mb: float):
        self.model, self.tower, self.connector = model, family_for("idefics3").vision_tower(model), model.model.connector
        self.max_bytes, self.bytes, self.states = max_mb * 2**20, 0, {}
        self.hits = self.misses = 0

    @staticmethod
    def supported(model, cfg: "TrainConfig", num_processes: int) -> bool:
        # several processes: DDP must see every trained weight used inside its own forward, so the
        # connector and embeddings cannot run outside it
        return cfg.freeze_vision and cfg.tower_cache_mb > 0 and num_processes == 1 \
            and model.config.model_type == "idefics3"

    def _tower(self, pixels, keys: list[str]):
        import torch

        rows = [self.states.get(k) for k in keys]
        missing = [i for i, h in enumerate(rows) if h is None]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        if missing:
            with torch.no_grad():
                out = self.tower(pixel_values=pixels[missing]).last_hidden_state
            for i, h in zip(missing, out):
                rows[i] = h
                if self.bytes + h.numel() * h.element_size() <= self.max_bytes:
                    self.states[keys[i]] = h.clone()  # a view would keep its whole batch alive
                    self.bytes += h.numel() * h.element_size()
        return torch.stack(rows)

    def inputs_embeds(self, input_ids, pixels, keys: list[str]):
        """Token embeddings with the image slots filled (`training.features.fill_image_slots`)."""
        return fill_image_slots(self.model, input_ids, self.connector(self._tower(pixels, keys)),
                                self.model.config.image_token_id)


def model_inputs(batch: dict, tower_cache: "TowerCache | None", family) -> dict:
    """The batch's model inputs: cached tower states in the embeddings, or ids and pixels."""
    if tower_cache is not None:
        return {"inputs_embeds": tower_cache.inputs_embeds(batch["input_ids"], batch["pixels"], batch["images"])}
    return {"input_ids": batch["input_ids"], **family.pixel_kwargs(batch["pixels"])}


def validation_loss(model, batches, tower_cache, family, device) -> float:
    """Mean next-token loss over every trained token of `batches` (held-out rows), in eval mode."""
    import torch

    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                keep = trained_positions(batch["labels"])
                out = model(**model_inputs(batch, tower_cache, family), attention_mask=batch["attention_mask"],
                            logits_to_keep=keep)
                n = int(keep.sum())
                total += float(next_token_loss(out.logits, batch["labels"], keep)) * n
                tokens += n
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def trained_positions(labels):
    """[B, S] bool: the positions whose next token is trained on (`labels` is not -100 one step on).

    Passed as the model's `logits_to_keep`, it projects only those hidden states onto the vocabulary:
    the image tokens and chat template, most of a VLM prompt, get no logits and no softmax."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def next_token_loss(logits, labels, keep):
    """Mean cross-entropy of the kept positions' logits [N, V] against their next tokens: the same
    value as the model's own loss over full logits, without computing the rest."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])


def premise_loss(hidden_states, mid_layer: int, question_mask, negative, probe):
    """BCE of a linear probe on the question's mean hidden states [mid, last], as guard.head pools them."""
    import torch

    w = question_mask / question_mask.sum(1, keepdim=True)  # [B, S]
    pooled = torch.cat([torch.einsum("bs,bsd->bd", w, hidden_states[mid_layer]),
                        torch.einsum("bs,bsd->bd", w, hidden_states[-1])], dim=-1)
    return torch.nn.functional.binary_cross_entropy_with_logits(probe(pooled)[:, 0], negative)


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
    dataset = EncodedExamples(examples, prompter, cfg.max_answer_tokens, cfg.question_lm)
    if cfg.group_by_length:
        dataset.reorder(group_by_length([dataset.length(i) for i in range(len(dataset))], cfg.batch_size, seed=cfg.seed))
    pad_id = spec.eos_token_ids[0]  # padded positions are masked out of attention and loss
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad_id))
    eval_batches = None
    if cfg.eval_data:
        eval_parts, data_record["eval_sources"] = load_training_examples(cfg, cfg.eval_data)
        for note in data_record["eval_sources"]["notes"]:
            acc.print(f"validation: {note}")
        rows = min(cfg.eval_rows, sum(len(p) for p, _ in eval_parts))
        # decoded per validation, not kept: at 512 px, 256 rows of pixels would hold ~0.8 GB for the whole run
        held_out = EncodedExamples(mix(eval_parts, rows, seed=cfg.seed + 1), prompter, cfg.max_answer_tokens,
                                   cfg.question_lm, cache_pixels=False)

        def eval_batches():
            return (collate([held_out[i] for i in range(s, min(s + cfg.batch_size, rows))], pad_id)
                    for s in range(0, rows, cfg.batch_size))

    # 2) Model, optimizer, schedule.
    base = load_model(cfg.model)
    tower_cache = TowerCache(base, cfg.tower_cache_mb) if TowerCache.supported(base, cfg, acc.num_processes) else None
    model = _trainable(base, cfg, family)
    probe = torch.nn.Linear(2 * spec.hidden_size, 1)  # the auxiliary premise probe; discarded after training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params + list(probe.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps // 2), cfg.steps)
    model, probe, opt, loader, sched = acc.prepare(model, probe, opt, loader, sched)

    # 3) Resume where an interrupted run stopped.
    step = _resume(acc, out)
    batches = acc.skip_first_batches(loader, step) if step else loader
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {out.name}", unit="step", position=cfg.progress_position,
               disable=not (cfg.show_progress and acc.is_local_main_process))
    model.train()
    ema, t_start, step_times, eval_loss = None, time.perf_counter(), [], []
    try:
        for batch in batches:
            t = time.perf_counter()
            aux = cfg.premise_loss_weight > 0
            keep = trained_positions(batch["labels"])
            result = model(**model_inputs(batch, tower_cache, family), attention_mask=batch["attention_mask"],
                           logits_to_keep=keep, output_hidden_states=aux)
            loss = next_token_loss(result.logits, batch["labels"], keep)
            if aux:
                loss = loss + cfg.premise_loss_weight * premise_loss(
                    result.hidden_states, spec.mid_layer, batch["question_mask"], batch["negative"], probe)
            acc.backward(loss)
            acc.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            step_times.append(time.perf_counter() - t)
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar.update(1)
            if eval_batches is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step >= cfg.steps):
                eval_loss.append({"step": step, "loss": validation_loss(model, eval_batches(), tower_cache, family,
                                                                        acc.device)})
            bar.set_postfix(loss=f"{ema:.3f}", ex_s=f"{cfg.batch_size * acc.num_processes / step_times[-1]:.1f}",
                            **({"val": f"{eval_loss[-1]['loss']:.3f}"} if eval_loss else {}))
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
            "eval_loss": eval_loss,
            "num_processes": acc.num_processes,
            "distributed": f"{acc.distributed_type.value}:{acc.state.backend}" if acc.num_processes > 1 else "no",
            "trainable_params": sum(p.numel() for p in params),
            "tower_cache": {"images": len(tower_cache.states), "mb": round(tower_cache.bytes / 2**20, 1),
                            "hits": tower_cache.hits, "misses": tower_cache.misses}
            if tower_cache is not None else None,
        })
    acc.wait_for_everyone()
    return out


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_side_by_side(cfgs: list[TrainConfig]) -> list[Path]:
    """Train independent runs at the same time, one process each, the CPU cores split evenly between
    them; -> their output directories, in order.

    On a small CPU host the nano model's matrices are too small for extra threads to pay: on 2 cores,
    two 1-thread runs side by side take ~240 ms a step each, one 2-thread run ~160 ms, so a pair of
    runs finishes ~1.3x sooner side by side. Runs go one after the other, in this process, when there
    are fewer cores than runs or a GPU (which the runs would share). If a run fails, its error is
    raised once every run has ended; the others' outputs are complete.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    cores = usable_cores()
    if len(cfgs) < 2 or cores < len(cfgs) or torch.cuda.is_available():
        return [train(c) for c in cfgs]
    with ProcessPoolExecutor(len(cfgs), mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [pool.submit(_train_in_worker, replace(c, progress_position=i), cores // len(cfgs))
                for i, c in enumerate(cfgs)]
        return [run.result() for run in runs]


def _train_in_worker(cfg: TrainConfig, threads: int) -> Path:
    import torch

    torch.set_num_threads(threads)
    return train(cfg)


def _trainable(model, cfg: TrainConfig, family):
    if cfg.freeze_vision:
        family.vision_tower(model).requires_grad_(False)
    if cfg.freeze_connector:
        family.connector(model).requires_grad_(False)
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


# --- CLI ----------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (LoRA or full) on MedHallTune-format data, then fit its guard heads",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
        epilog="""examples:
  medhallguard train --model base/ --out tuned/ --data train.json:3 --data val_negative_qa-filtered.jsonl:1 \\
      --image-dir images/ --mode lora --steps 500
  accelerate launch --multi_gpu --num_processes 2 -m training.train --model base/ --out tuned/ --data train.json
      (data parallel: GPUs with NCCL, or CPU processes with gloo on a machine without GPUs)
  medhallguard train ... --eval-data heldout.json --eval-every 100   (a validation loss every 100 steps)
  medhallguard train ... --heads-labelled phantom/train.json --heads-scored llava-med-prediction-*.jsonl
""",
    )
    _add_arguments(p)
    p.set_defaults(func=_run)


def _add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="input model directory (Hugging Face save_pretrained layout)")
    p.add_argument("--out", required=True, help="output directory; rerun with the same one to resume")
    p.add_argument("--data", action="append", required=True, metavar="FILE[:WEIGHT[:IMAGE_DIR[:POLARITY]]]",
                   help="a MedHallTune-format file (JSONL or LLaVA JSON), optionally weighted; repeatable. POLARITY "
                        "(positive or negative) draws only those rows, e.g. --data qa.json:3::positive --data qa.json:1::negative")
    p.add_argument("--image-dir", help="default image folder for --data files that name none")
    p.add_argument("--allow-missing-images", action="store_true",
                   help="train rows whose image is missing on a blank image (recorded in train_record.json)")
    p.add_argument("--mode", choices=("lora", "full"), default="lora", help="default: lora")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step per process (default 8)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--no-merge", action="store_true", help="LoRA: save the adapter only (not servable as is)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="keep the vision tower fixed (e.g. a pretrained one); the connector and text model train")
    p.add_argument("--freeze-connector", action="store_true",
                   help="keep the connector fixed too: the text model alone learns to read the image tokens")
    p.add_argument("--positive-only", action="store_true", help="drop negative questions (the baseline recipe)")
    p.add_argument("--question-lm", action="store_true",
                   help="also train next-token prediction on the question's tokens (the premise head reads their states)")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together: less padding, faster steps on mixed sources")
    p.add_argument("--eval-data", action="append", default=[], metavar="FILE[:WEIGHT[:IMAGE_DIR]]",
                   help="held-out MedHallTune-format file for a validation loss (repeatable, like --data)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between validation losses (default 0: once, at the end)")
    p.add_argument("--eval-rows", type=int, default=256, help="validation rows drawn from --eval-data (default 256)")
    p.add_argument("--premise-loss-weight", type=float, default=0.0,
                   help="weight of the auxiliary premise loss: a probe on the question's mean hidden states "
                        "predicts negative questions (default 0: off)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-id", help="id written to medhallguard.json (default: the output folder's name)")
    p.add_argument("--heads-labelled", action="append", default=[], metavar="FILE",
                   help="PhantomVQA-format rows whose generated answers are judged exactly -> p(hallucination)")
    p.add_argument("--heads-scored", action="append", default=[], metavar="FILE",
                   help="scored prediction JSONL (another model's answers + GPT-4o scores) -> the four scores")
    p.add_argument("--heads-contrast-model", action="append", default=[], metavar="DIR",
                   help="another model whose answers to --heads-labelled also train p(hallucination)")


def config_from_args(args) -> TrainConfig:
    def sources(specs) -> tuple[DataSource, ...]:
        parsed = [DataSource.parse(spec) for spec in specs]
        return tuple(replace(s, image_dir=s.image_dir or args.image_dir) for s in parsed)

    return TrainConfig(model=args.model, out=args.out, data=sources(args.data), mode=args.mode, steps=args.steps,
                       eval_data=sources(args.eval_data), eval_every=args.eval_every, eval_rows=args.eval_rows,
                       batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, lora_r=args.lora_r,
                       lora_alpha=args.lora_alpha, merge=not args.no_merge, allow_missing_images=args.allow_missing_images,
                       positive_only=args.positive_only, freeze_vision=args.freeze_vision,
                       freeze_connector=args.freeze_connector, checkpoint_every=args.checkpoint_every, seed=args.seed,
                       model_id=args.model_id, premise_loss_weight=args.premise_loss_weight,
                       question_lm=args.question_lm, group_by_length=args.group_by_length)


def _run(args) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:  # a bad --data spec or setting: say which, no traceback
        print(f"medhallguard train: {e}")
        return 2
    out = train(cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if args.heads_labelled or args.heads_scored:
        if cfg.mode == "lora" and not cfg.merge:
            raise SystemExit("error: --heads-* needs a servable model; drop --no-merge")
        _fit_heads(args, out)
    run = json.loads((out / "train_record.json").read_text())["run"]
    print(f"wrote {out}: {run['steps_this_run']} steps, median step {run['step_time_s_median']:.2f} s, "
          f"peak RSS {run['peak_rss_mb']:.0f} MB, {run['trainable_params']:,} trainable parameters")
    if run.get("eval_loss"):
        print("validation loss: " + ", ".join(f"{e['loss']:.4f} at step {e['step']}" for e in run["eval_loss"]))
    return 0


def _fit_heads(args, out: Path) -> None:
    from training.heads import collect_features, fit_heads, save_heads

    labelled = [e for f in args.heads_labelled for e in load_examples(f, args.image_dir or _default_image_dir(Path(f)),
                                                                     allow_missing_images=args.allow_missing_images).examples]
    scored = [e for f in args.heads_scored for e in load_examples(f, args.image_dir, allow_missing_images=True).examples
              if e.scores is not None]
    rows = collect_features(out, labelled, scored, answer_models=[out, *map(Path, args.heads_contrast_model)])
    heads, metrics = fit_heads(rows)
    save_heads(heads, out)
    print(f"guard heads on the calibration fold: {json.dumps(metrics)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m training.train ...`: the entry point for `accelerate launch`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    _add_arguments(p)
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
