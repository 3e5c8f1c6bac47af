"""Training mechanics on tiny models: resume, LoRA + merge, head fitting, multi-process launch."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guard.decode import question_ids
from guard.prompt import Prompter
from guard.runtime import load_guard
from guard.spec import spec_from_hf_dir
from guard.types import DecodeConfig, VqaRequest
from training import train as train_mod
from training.train import DataSource, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from training.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_dataset(out, n_images=24, seed=1)
    return out


def _cfg(model, out, phantom, **kw) -> TrainConfig:
    base = dict(model=str(model), out=str(out), data=(DataSource(str(phantom / "train.json")),), mode="full",
                steps=6, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=3, show_progress=False)
    return TrainConfig(**{**base, **kw})


def _weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_an_interrupted_run_resumes_to_the_same_weights(nano_models, phantom, tmp_path, monkeypatch, group_by_length):
    model = nano_models["smolvlm"]
    train(_cfg(model, tmp_path / "straight", phantom, group_by_length=group_by_length))

    real = train_mod._checkpoint
    calls = []

    def checkpoint_then_interrupt(acc, out, step, keep):
        real(acc, out, step, keep)
        calls.append(step)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_checkpoint", checkpoint_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model, tmp_path / "resumed", phantom, group_by_length=group_by_length))
    monkeypatch.setattr(train_mod, "_checkpoint", real)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    train(_cfg(model, tmp_path / "resumed", phantom, group_by_length=group_by_length))

    record = json.loads((tmp_path / "resumed" / "train_record.json").read_text())
    assert record["run"]["steps_this_run"] == 3  # only the steps after the checkpoint ran again
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_the_run_record_names_config_data_hashes_and_versions(nano_models, phantom, tmp_path):
    out = train(_cfg(nano_models["llava"], tmp_path / "rec", phantom, steps=2, checkpoint_every=0))
    record = json.loads((out / "train_record.json").read_text())
    assert record["config"]["steps"] == 2
    (digest,) = record["data"]["sources"][0]["sha256"].values()
    assert len(digest) == 64
    assert record["libraries"]["transformers"] and record["libraries"]["torch"]
    assert record["run"]["peak_rss_mb"] > 0 and record["run"]["step_time_s_median"] > 0


@pytest.mark.parametrize("family", ["smolvlm", "llava"])
def test_lora_trains_only_adapters_and_merges_into_a_servable_model(nano_models, phantom, tmp_path, family):
    out = train(_cfg(nano_models[family], tmp_path / "lora", phantom, mode="lora", steps=3, lr=1e-2))
    record = json.loads((out / "train_record.json").read_text())
    total = sum(v.size for v in _weights(nano_models[family]).values())
    assert 0 < record["run"]["trainable_params"] < total / 10
    assert not any("lora" in k for k in _weights(out))  # merged: plain weights only
    changed = [k for k, v in _weights(out).items() if not np.array_equal(v, _weights(nano_models[family])[k])]
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    guard = load_guard(out)
    from tests.conftest import png_bytes

    result = guard.answer(VqaRequest(png_bytes(), "image/png", "Is there a nodule?", DecodeConfig(max_new_tokens=4)))
    assert result.model_id == "lora" and result.scores is not None


def test_lora_without_merge_writes_an_adapter(nano_models, phantom, tmp_path):
    out = train(_cfg(nano_models["smolvlm"], tmp_path / "adapter", phantom, mode="lora", steps=1, merge=False))
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_head_fitting_pipeline_writes_trained_heads_the_runtime_loads(nano_models, phantom, tmp_path):
    from training.data import load_examples
    from training.heads import HeadFitConfig, collect_features, fit_heads, save_heads

    model = tmp_path / "m"
    shutil.copytree(nano_models["smolvlm"], model)
    examples = load_examples(phantom / "train.json", phantom / "images").examples
    labelled = examples[:24]
    # stand-ins for scored MedHallTune rows: another model's answer and four scores
    scored = [dataclasses.replace(e, model_answer="No.", scores=(i % 9 + 1.0,) * 4) for i, e in enumerate(examples[24:48])]
    rows = collect_features(model, labelled, scored, answer_models=[model], max_new_tokens=6, batch_size=8,
                            log=lambda *_: None)
    assert len(rows.answer_x) == len(labelled) + len(scored) and len(rows.premise_y) == len(labelled) + len(scored)
    assert rows.premise_source == ["phantom"] * len(labelled) + ["medhalltune"] * len(scored)
    prompter = Prompter(model / "tokenizer.json", spec_from_hf_dir(model))
    ids = prompter.encode_prompt(labelled[0].question)
    assert rows.premise_ids[0].tolist() == question_ids(ids, spec_from_hf_dir(model).image_token_id).tolist()
    # A random-init model's answers are judged; force both classes so the fit has something to separate.
    rows.answer_y = [[float(i % 2)] + y[1:] for i, y in enumerate(rows.answer_y)]
    heads, metrics = fit_heads(rows, HeadFitConfig(steps=20))
    save_heads(heads, model)
    guard = load_guard(model)
    assert guard.heads.trained and guard.heads.info["calibration"]["answer_rows"] == len(labelled) + len(scored)
    assert {"p_hallucination_auroc", "premise_auroc", "risk_level_spearman"} <= metrics.keys()
    assert len(guard.heads.premise_ngrams) == metrics["premise_refit"]["premise_ngram_vocabulary"] > 0
    assert metrics["premise_fit_rows"] in ("medhalltune", "all")
    assert {"hidden", "ngrams", "both"} <= metrics["premise_ablation"]["medhalltune"].keys()


def test_the_served_premise_head_is_refit_on_every_row_with_the_calibration_folds_temperature(nano_models, phantom):
    from training.data import load_examples
    from training.heads import HeadFitConfig, collect_features, fit_heads, fit_premise

    examples = load_examples(phantom / "train.json", phantom / "images").examples
    scored = [dataclasses.replace(e, model_answer="No.", scores=(i % 9 + 1.0,) * 4) for i, e in enumerate(examples[24:72])]
    rows = collect_features(nano_models["smolvlm"], examples[:24], scored, answer_models=[nano_models["smolvlm"]],
                            max_new_tokens=4, batch_size=8, log=lambda *_: None)
    rows.answer_y = [[float(i % 2)] + y[1:] for i, y in enumerate(rows.answer_y)]
    held, _ = fit_heads(rows, HeadFitConfig(steps=5, premise_refit=False))
    refit, metrics = fit_heads(rows, HeadFitConfig(steps=5))
    x, y = np.stack(rows.premise_x), np.array(rows.premise_y)
    everything, _, _, _ = fit_premise(x, rows.premise_ids, y, rows.premise_group,
                                      np.array(rows.premise_source) == "medhalltune")
    assert np.array_equal(refit.premise.w, everything.w) and not np.array_equal(held.premise.w, everything.w)
    assert refit.premise_temperature == held.premise_temperature == pytest.approx(metrics["premise_temperature"], abs=1e-4)


@pytest.mark.timeout(600)
def test_the_same_command_trains_data_parallel_under_accelerate_launch(nano_models, phantom, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    # accelerate's `--cpu` launcher needs MPI; its torchrun launcher (`--multi_gpu`) starts the processes,
    # and on a machine without GPUs the Accelerator joins them over gloo (DistributedType.MULTI_CPU).
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "training.train", "--model", str(nano_models["smolvlm"]), "--out", str(out),
           "--data", str(phantom / "train.json"), "--mode", "full", "--steps", "2", "--batch-size", "2",
           "--checkpoint-every", "0", "--eval-data", str(phantom / "heldout.json"), "--eval-rows", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "train_record.json").read_text())
    assert record["run"]["num_processes"] == 2 and record["run"]["distributed"] == "MULTI_CPU:gloo"
    assert [e["step"] for e in record["run"]["eval_loss"]] == [2]  # validation runs under DDP too
    load_guard(out)  # the result serves


def test_the_premise_loss_reads_only_the_question_positions_and_reaches_the_weights(nano_models, phantom, tmp_path):
    import torch

    from training.train import premise_loss

    torch.manual_seed(0)
    hidden = [torch.randn(2, 6, 4) for _ in range(3)]
    question = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.float32)
    probe = torch.nn.Linear(8, 1)
    negative = torch.tensor([1.0, 0.0])
    base = premise_loss(hidden, 1, question, negative, probe)
    outside = [h.clone() for h in hidden]
    for h in outside:
        h[question == 0] += 5.0
    assert torch.allclose(premise_loss(outside, 1, question, negative, probe), base)
    inside = [h.clone() for h in hidden]
    inside[-1][0, 2] += 5.0
    assert not torch.allclose(premise_loss(inside, 1, question, negative, probe), base)
    # The same seeded run with and without the loss ends with different weights: the loss is trained on.
    plain = train(_cfg(nano_models["smolvlm"], tmp_path / "plain", phantom, mode="full", steps=2))
    aux = train(_cfg(nano_models["smolvlm"], tmp_path / "aux", phantom, mode="full", steps=2, premise_loss_weight=5.0))
    from safetensors.numpy import load_file

    a, b = load_file(plain / "model.safetensors"), load_file(aux / "model.safetensors")
    assert any(not np.array_equal(a[k], b[k]) for k in a if "text_model" in k or "language_model" in k)


@pytest.mark.parametrize("family", ["smolvlm", "llava"])
def test_logits_only_at_trained_positions_give_the_models_own_loss_and_gradients(nano_models, family):
    import torch

    from guard.backends.torch_backend import load_model
    from training.train import next_token_loss, trained_positions

    model = load_model(nano_models[family])
    spec = spec_from_hf_dir(nano_models[family])
    prompter = Prompter(Path(nano_models[family]) / "tokenizer.json", spec)
    prompt = prompter.encode_prompt("Is there a nodule?").tolist()
    answer = prompter.encode_answer("No, there is no nodule.")
    ids = torch.tensor([prompt + answer, prompt + answer[:3] + [0] * (len(answer) - 3)])
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    labels[1, len(prompt) + 3:] = -100  # the second row is padded
    size = spec.preprocess.image_size
    pixels = torch.from_numpy(np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32))
    from guard.families import family_for

    kwargs = dict(input_ids=ids, attention_mask=(labels != -100) | (torch.arange(ids.shape[1]) < len(prompt)),
                  **family_for(model.config.model_type).pixel_kwargs(pixels))

    def loss_and_grads(fast: bool):
        model.zero_grad()
        if fast:
            keep = trained_positions(labels)
            out = model(**kwargs, logits_to_keep=keep)
            assert out.logits.shape[0] == int((labels != -100).sum())  # one logit row per trained token
            loss = next_token_loss(out.logits, labels, keep)
        else:
            loss = model(**kwargs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (full, full_grads), (fast, fast_grads) = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(fast, full, atol=1e-6)
    assert full_grads.keys() == fast_grads.keys()
    for name in full_grads:
        assert torch.allclose(fast_grads[name], full_grads[name], atol=1e-6), name


def test_freeze_vision_keeps_the_tower_fixed_while_the_connector_and_text_model_train(nano_models, phantom, tmp_path):
    before = _weights(nano_models["smolvlm"])
    out = train(_cfg(nano_models["smolvlm"], tmp_path / "frozen", phantom, freeze_vision=True, checkpoint_every=0))
    after = _weights(out)
    tower = [k for k in before if ".vision_model." in k]
    assert tower and all(np.array_equal(before[k], after[k]) for k in tower)
    moved = [k for k in before if k not in tower and not np.array_equal(before[k], after[k])]
    assert any(".connector." in k for k in moved) and any(".text_model." in k for k in moved)


def test_freeze_connector_keeps_the_tower_and_connector_fixed_while_the_text_model_trains(nano_models, phantom, tmp_path):
    before = _weights(nano_models["smolvlm"])
    out = train(_cfg(nano_models["smolvlm"], tmp_path / "frozen", phantom, freeze_vision=True, freeze_connector=True,
                     checkpoint_every=0))
    after = _weights(out)
    fixed = [k for k in before if ".vision_model." in k or ".connector." in k]
    assert any(".connector." in k for k in fixed) and all(np.array_equal(before[k], after[k]) for k in fixed)
    assert any(not np.array_equal(before[k], after[k]) for k in before if ".text_model." in k)


def test_the_tower_cache_trains_to_the_same_weights_as_running_the_tower_every_step(nano_models, phantom, tmp_path):
    kw = dict(freeze_vision=True, checkpoint_every=0, steps=8, group_by_length=True)
    cached = train(_cfg(nano_models["smolvlm"], tmp_path / "cached", phantom, **kw))
    direct = train(_cfg(nano_models["smolvlm"], tmp_path / "direct", phantom, tower_cache_mb=0, **kw))
    record = json.loads((cached / "train_record.json").read_text())["run"]
    cache = record["tower_cache"]
    assert cache["images"] > 0 and cache["hits"] > 0  # images recur over 8 steps of 4: some came from the cache
    assert cache["hits"] + cache["misses"] == 8 * 4
    assert json.loads((direct / "train_record.json").read_text())["run"]["tower_cache"] is None
    a, b = _weights(cached), _weights(direct)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_runs_trained_side_by_side_reach_the_same_weights_as_each_run_alone(nano_models, phantom, tmp_path,
                                                                           monkeypatch):
    import torch

    monkeypatch.setattr(train_mod, "usable_cores", lambda: 2)  # the two-process path, whatever the runner has
    model = nano_models["smolvlm"]
    cfgs = [_cfg(model, tmp_path / "tuned", phantom, checkpoint_every=0),
            _cfg(model, tmp_path / "baseline", phantom, checkpoint_every=0, positive_only=True)]
    outs = train_mod.train_side_by_side(cfgs)
    assert outs == [tmp_path / "tuned", tmp_path / "baseline"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each side-by-side run had one of the two cores
    try:
        alone = [train(dataclasses.replace(c, out=str(tmp_path / f"alone-{i}"))) for i, c in enumerate(cfgs)]
    finally:
        torch.set_num_threads(threads)
    for side, single in zip(outs, alone):
        a, b = _weights(side), _weights(single)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert not np.array_equal(_weights(outs[0])["model.text_model.embed_tokens.weight"],
                              _weights(outs[1])["model.text_model.embed_tokens.weight"])  # two different runs


def test_side_by_side_trains_one_run_after_the_other_when_there_are_fewer_cores_than_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(train_mod, "usable_cores", lambda: 1)
    ran = []
    monkeypatch.setattr(train_mod, "train", lambda cfg: ran.append(cfg.out) or Path(cfg.out))
    cfgs = [TrainConfig(model="m", out=str(tmp_path / name), data=(DataSource("d.json"),)) for name in ("a", "b")]
    assert train_mod.train_side_by_side(cfgs) == [tmp_path / "a", tmp_path / "b"]
    assert ran == [str(tmp_path / "a"), str(tmp_path / "b")]  # in this process, in order


def test_the_tower_cache_stores_no_more_than_its_limit(nano_models):
    import torch

    from guard.backends.torch_backend import load_model

    model = load_model(nano_models["smolvlm"])
    n_image = spec_from_hf_dir(nano_models["smolvlm"]).num_image_tokens
    cache = train_mod.TowerCache(model, max_mb=0.001)  # ~1 KiB: smaller than one image's states
    ids = torch.full((2, n_image + 3), 5)
    ids[:, 1 : 1 + n_image] = model.config.image_token_id
    emb = cache.inputs_embeds(ids, torch.randn(2, 3, 64, 64), ["a", "b"])
    assert emb.shape == (2, n_image + 3, model.config.text_config.hidden_size)
    assert cache.states == {} and cache.bytes == 0  # computed, used, not stored


def test_vision_pretraining_changes_only_the_tower_and_connector_and_reports_held_out_probes(nano_models, phantom,
                                                                                            tmp_path):
    from training.vision_pretrain import VisionPretrainConfig, pretrain_vision

    model = tmp_path / "model"
    shutil.copytree(nano_models["smolvlm"], model)
    before = _weights(model)
    record = pretrain_vision(model, phantom, VisionPretrainConfig(steps=3, batch_size=4, show_progress=False),
                             log=lambda *_: None)
    after = _weights(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(".vision_model." in k or ".connector." in k for k in changed)
    assert any(".vision_model." in k for k in changed) and any(".connector." in k for k in changed)
    probe = record["heldout_probe"]
    assert probe["images"] == sum(1 for r in json.loads((phantom / "cases.json").read_text())["cases"]
                                  if r["split"] != "train")
    assert set(probe["presence"]) == set(probe["presence_base_rate"])
    load_guard(model)  # still a servable model directory


@pytest.mark.parametrize("weight, loss", [("presence_weight", "presence"), ("centre_weight", "centre")])
def test_an_extra_vision_loss_is_trained_on_and_moves_the_tower(nano_models, phantom, tmp_path, weight, loss):
    from training.vision_pretrain import VisionPretrainConfig, pretrain_vision

    runs = {}
    for value in (0.0, 5.0):
        model = tmp_path / f"model-{value}"
        shutil.copytree(nano_models["smolvlm"], model)
        cfg = VisionPretrainConfig(steps=3, batch_size=4, show_progress=False, **{weight: value})
        runs[value] = (pretrain_vision(model, phantom, cfg, log=lambda *_: None), _weights(model))
    (plain, w0), (extra, w5) = runs[0.0], runs[5.0]
    assert loss not in plain["final_loss_ema"] and extra["final_loss_ema"][loss] > 0
    assert any(not np.array_equal(w0[k], w5[k]) for k in w0 if ".vision_model." in k)
    assert set(extra["heldout_probe"]["presence_auroc_image_probe"]) == set(plain["heldout_probe"]["presence"])
    assert 0 <= plain["heldout_probe"]["count"] <= 1 and plain["heldout_probe"]["size_mae_mm"] >= 0
    # the centre probe's count is reported only when it was trained
    assert ("count_centre_sum" in extra["heldout_probe"]) == (loss == "centre")
    assert "count_centre_sum" not in plain["heldout_probe"]


def test_attention_image_probe_reads_the_tokens_by_content_not_by_position():
    import torch

    from training.vision_pretrain import _N_IMAGE, _Probes

    torch.manual_seed(0)
    feats = torch.randn(3, 16, 128)
    shuffled = feats[:, torch.randperm(16)]
    attention = _Probes(16, 128, 64, "attention").image
    flat = _Probes(16, 128, 64, "flat").image
    with torch.no_grad():
        assert attention(feats).shape == flat(feats).shape == (3, _N_IMAGE)
        torch.testing.assert_close(attention(shuffled), attention(feats))  # a query finds a token wherever it is
        assert not torch.allclose(flat(shuffled), flat(feats))  # the flat probe weighs each position on its own


def test_vision_pretraining_with_the_attention_probe_trains_the_tower(nano_models, phantom, tmp_path):
    from training.phantom import FINDING_KINDS
    from training.vision_pretrain import VisionPretrainConfig, pretrain_vision

    model = tmp_path / "model"
    shutil.copytree(nano_models["smolvlm"], model)
    before = _weights(model)
    cfg = VisionPretrainConfig(steps=3, batch_size=4, image_probe="attention", show_progress=False)
    record = pretrain_vision(model, phantom, cfg, log=lambda *_: None)
    after = _weights(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before if ".vision_model." in k)
    assert record["config"]["image_probe"] == "attention" and set(record["heldout_probe"]["presence"]) == set(FINDING_KINDS)
    with pytest.raises(ValueError, match="image_probe"):
        VisionPretrainConfig(image_probe="linear")


def test_patch_targets_mark_exactly_the_patches_a_finding_is_drawn_in():
    from training.phantom import FINDING_KINDS, Case, finding_masks, generate
    from training.vision_pretrain import image_targets, patch_targets

    case = next(c for c in generate(60, seed=3) if len(c.findings) == 2)
    grid = 16
    targets = patch_targets(case, 64, grid)
    for f, mask in zip(case.findings, finding_masks(case, 64)):
        k = FINDING_KINDS.index(f.kind)
        cells = mask.reshape(grid, 4, grid, 4).any((1, 3)).reshape(-1)
        assert cells.any() and np.array_equal(targets[:, k] > 0, cells)
    absent = [k for k, kind in enumerate(FINDING_KINDS) if case.finding(kind) is None]
    assert not targets[:, absent].any()
    t = image_targets(case)
    assert t["present"].sum() == 2 and (t["side"] >= 0).sum() == 2 and np.isnan(t["size"]).sum() == len(FINDING_KINDS) - 2
    normal = Case("normal", "chest X-ray", (), 1, 5.0)
    assert not patch_targets(normal, 64, grid).any() and image_targets(normal)["present"].sum() == 0


def test_centre_targets_put_each_counted_disc_in_one_patch_it_is_drawn_in():
    from training.phantom import COUNT_KINDS, FINDING_KINDS, generate
    from training.vision_pretrain import centre_targets, patch_targets

    grid, checked = 16, 0
    for case in generate(200, seed=5):
        centres, drawn = centre_targets(case, grid), patch_targets(case, 64, grid)
        for j, kind in enumerate(COUNT_KINDS):
            f = case.finding(kind)
            assert centres[:, j].sum() == (f.count if f else 0)
            assert (drawn[centres[:, j] > 0, FINDING_KINDS.index(kind)] == 1).all()
            checked += bool(f and f.count > 1)
    assert checked  # the generated cases include several discs of one kind


def test_source_balance_weighs_each_source_alike_with_mean_one():
    from training.heads import source_balance

    w = source_balance(np.array([True] * 3 + [False] * 9))
    assert w[:3].sum() == pytest.approx(w[3:].sum()) and w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(source_balance(np.zeros(5, bool)), 1.0)  # one source: every row alike


def test_cv_pick_fits_only_train_rows_and_scores_each_part_alike():
    from training.heads import _cv_pick

    seen = []

    class Recorder:
        def __init__(self, v):
            self.v = v

        def fit(self, x, y, sample_weight=None):
            seen.append(set(x[:, 0].astype(int).tolist()))
            return self

    x = np.arange(12, dtype=float)[:, None]
    y = np.zeros(12)
    groups = np.arange(12) % 6  # every group, so every fold, holds rows of both parts
    train_rows = np.arange(12) >= 4  # rows 0-3 are never fitted on
    parts = (np.arange(12) < 6).astype(int)
    # part 0 (rows 6-11) scores 1.0, part 1 (rows 0-5) 0.0; scored as one, a fold would score its first row: 0.0
    score = lambda yt, m, xt: float(xt[0, 0] >= 6)  # noqa: E731
    best, value = _cv_pick(Recorder, [1, 2], x, y, groups, score, folds=3, train_rows=train_rows, score_by=parts)
    assert all(not ({0, 1, 2, 3} & rows) for rows in seen)
    assert value == 0.5


def test_build_default_set_overrides_typed_recipe_fields_and_rejects_unknown_ones(capsys):
    from training.build_default import DefaultRecipe, recipe_with

    r = recipe_with(["steps=1300", "seed=1", "group_by_length=false", "lr=1e-3"])
    assert (r.steps, r.seed, r.group_by_length, r.lr) == (1300, 1, False, 1e-3)
    assert recipe_with([]) == DefaultRecipe()
    with pytest.raises(ValueError, match="FIELD one of"):
        recipe_with(["stepz=3"])
    with pytest.raises(ValueError, match="steps takes a int value"):
        recipe_with(["steps=many"])
    assert recipe_with(["vision_image_probe=flat"]).vision_image_probe == "flat"
    with pytest.raises(ValueError, match="vision_image_probe"):
        recipe_with(["vision_image_probe=linear"])
    assert subprocess.run([sys.executable, "-m", "server.cli", "build-default", "--set", "seed=1"], cwd=ROOT,
                          capture_output=True, text=True).stdout.count("give it its own --out folder") == 1


def test_a_source_with_a_polarity_draws_only_that_polaritys_rows(phantom, tmp_path):
    from training.data import mix
    from training.train import load_training_examples

    path = str(phantom / "train.json")
    cfg = _cfg("m", tmp_path, phantom, data=(DataSource(path, 3.0, polarity="positive"),
                                             DataSource(path, 1.0, polarity="negative")))
    parts, record = load_training_examples(cfg)
    assert [{e.polarity for e in rows} for rows, _ in parts] == [{"positive"}, {"negative"}]
    assert [s["polarity_filter"] for s in record["sources"]] == ["positive", "negative"]
    drawn = mix(parts, 400, seed=0)
    assert sum(e.polarity == "negative" for e in drawn) == 100
    assert DataSource.parse("a.json:3::positive") == DataSource("a.json", 3.0, None, "positive")
    assert DataSource.parse("a.json:2:imgs") == DataSource("a.json", 2.0, "imgs")
    with pytest.raises(ValueError, match="polarity must be one of positive, negative.*'postive'"):
        DataSource.parse("a.json:1::postive")
    with pytest.raises(ValueError, match="WEIGHT must be a number, got 'heavy'"):
        DataSource.parse("a.json:heavy")
    cli = subprocess.run([sys.executable, "-m", "server.cli", "train", "--model", "m", "--out", str(tmp_path / "o"),
                          "--data", "a.json:1::postive"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 2 and "polarity must be one of positive, negative" in cli.stdout and "Traceback" not in cli.stderr


def test_the_tuned_mix_draws_phantom_negatives_at_the_recipe_share_and_the_baseline_none(tmp_path):
    from training.build_default import DefaultRecipe, recipe_train_config

    recipe = DefaultRecipe(phantom_negative_share=0.2, medhalltune_weight=0.25)
    tuned = recipe_train_config(recipe, tmp_path, tmp_path / "init", tmp_path / "tuned", 10, positive_only=False)
    phantom, mht = str(tmp_path / "phantom" / "train.json"), str(tmp_path / "medhalltune" / "train.json")
    assert [(s.path, s.polarity) for s in tuned.data] == [(phantom, "positive"), (phantom, "negative"), (mht, None)]
    assert [s.weight for s in tuned.data] == pytest.approx([0.6, 0.15, 0.25])
    baseline = recipe_train_config(recipe, tmp_path, tmp_path / "init", tmp_path / "baseline", 10, positive_only=True)
    assert baseline.positive_only and [(s.path, s.polarity, s.weight) for s in baseline.data] == [
        (phantom, None, 0.75), (mht, None, 0.25)]
    for share in (0.0, 1.0):
        with pytest.raises(ValueError, match="phantom_negative_share"):
            DefaultRecipe(phantom_negative_share=share)


def _stub_build_stages_before_training(monkeypatch) -> None:
    """build_default's data, initial model and head stages as no-ops, so a test sees only its training runs."""
    import training.build_default as bd
    import training.init_model
    import training.phantom

    monkeypatch.setattr(training.phantom, "write_dataset", lambda *a, **k: None)
    monkeypatch.setattr(training.init_model, "init_model", lambda *a, **k: None)
    monkeypatch.setattr(bd, "_medhalltune", lambda root, seed: {"train": [], "heldout": [], "pred_train": [], "pred_heldout": []})
    monkeypatch.setattr(bd, "fit_default_heads", lambda *a, **k: {})


def test_build_default_continues_both_models_from_the_shared_base_phase_when_base_steps_is_set(monkeypatch, tmp_path):
    import training.build_default as bd
    import training.train as tt

    _stub_build_stages_before_training(monkeypatch)
    monkeypatch.setattr(tt, "train", lambda cfg: Path(cfg.out))
    started_from = {}
    monkeypatch.setattr(tt, "train_side_by_side", lambda cfgs: [started_from.setdefault(Path(c.out).name, c.model) for c in cfgs])
    recipe = bd.recipe_with(["base_steps=5", "steps=5", "vision_steps=0"])
    bd.build_default(tmp_path, recipe, log=lambda *a: None)
    assert started_from == {"tuned": str(tmp_path / "base"), "baseline": str(tmp_path / "base")}


def test_build_default_trains_phantom_alone_first_then_each_model_continues_on_the_full_mix(monkeypatch, tmp_path):
    import training.build_default as bd
    import training.train as tt

    _stub_build_stages_before_training(monkeypatch)
    runs = []

    def side_by_side(cfgs):
        runs.append({Path(c.out).name: (Path(c.model).name, c.steps,
                                        sorted(f"{Path(s.path).parent.name}:{s.polarity or 'all'}" for s in c.data),
                                        c.positive_only) for c in cfgs})
        return [Path(c.out) for c in cfgs]

    monkeypatch.setattr(tt, "train_side_by_side", side_by_side)
    bd.build_default(tmp_path, bd.recipe_with(["phantom_first_steps=3", "steps=10", "vision_steps=0"]), log=lambda *a: None)
    tuned_phantom = ["phantom:negative", "phantom:positive"]
    assert runs == [
        {"tuned-phantom-first": ("init", 3, tuned_phantom, False),
         "baseline-phantom-first": ("init", 3, ["phantom:all"], True)},
        {"tuned": ("tuned-phantom-first", 7, ["medhalltune:all", *tuned_phantom], False),
         "baseline": ("baseline-phantom-first", 7, ["medhalltune:all", "phantom:all"], True)},
    ]
    with pytest.raises(ValueError, match="phantom_first_steps"):
        bd.recipe_with(["phantom_first_steps=10", "steps=10"])


def test_the_validation_loss_is_recorded_at_its_steps_and_is_the_saved_models_loss_on_the_held_out_rows(
        nano_models, phantom, tmp_path):
    import torch

    from guard.backends.torch_backend import load_model
    from guard.families import family_for
    from training.data import mix
    from training.train import EncodedExamples, collate, load_training_examples, validation_loss

    held_out = (DataSource(str(phantom / "heldout.json")),)
    cfg = _cfg(nano_models["smolvlm"], tmp_path / "run", phantom, steps=4, eval_data=held_out, eval_every=2, eval_rows=5)
    out = train(cfg)
    history = json.loads((out / "train_record.json").read_text())["run"]["eval_loss"]
    assert [e["step"] for e in history] == [2, 4]
    assert history[0]["loss"] != history[1]["loss"]  # the model trained in between
    # the last one is the saved model's loss on the same five held-out rows
    spec = spec_from_hf_dir(out)
    parts, _ = load_training_examples(cfg, held_out)
    rows = EncodedExamples(mix(parts, 5, seed=cfg.seed + 1), Prompter(out / "tokenizer.json", spec), cfg.max_answer_tokens)
    batches = [collate([rows[i] for i in range(5)], spec.eos_token_ids[0])]
    saved = validation_loss(load_model(out), batches, None, family_for("idefics3"), torch.device("cpu"))
    assert abs(saved - history[-1]["loss"]) < 1e-4
    # validating changes nothing about training
    plain = train(_cfg(nano_models["smolvlm"], tmp_path / "plain", phantom, steps=4))
    a, b = _weights(plain), _weights(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_train_cli_takes_eval_data_like_data(tmp_path):
    import argparse

    from training.train import _add_arguments, config_from_args

    p = argparse.ArgumentParser()
    _add_arguments(p)
    args = p.parse_args(["--model", "m", "--out", "o", "--data", "a.json", "--eval-data", "b.json:2",
                         "--image-dir", "imgs", "--eval-every", "50", "--eval-rows", "64"])
    cfg = config_from_args(args)
    assert cfg.eval_data == (DataSource("b.json", 2.0, "imgs"),) and cfg.eval_every == 50 and cfg.eval_rows == 64
    with pytest.raises(ValueError, match="eval_every"):
        dataclasses.replace(cfg, eval_every=-1)
    assert not cfg.freeze_vision and not cfg.freeze_connector
    frozen = config_from_args(p.parse_args(["--model", "m", "--out", "o", "--data", "a.json", "--freeze-vision",
                                            "--freeze-connector"]))
    assert frozen.freeze_vision and frozen.freeze_connector
