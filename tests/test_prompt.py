"""Tests for guard.prompt: prompt templates from the model directory."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from guard.decode import question_ids
from guard.errors import ModelLoadError
from guard.prompt import Prompter, template_parts
from guard.spec import META_FILE, spec_from_hf_dir

QUESTION_FIRST = "<|im_start|>User:{question}\n{image}{question}<end_of_utterance>\nAssistant:"


def test_the_default_template_puts_the_question_once_after_the_image(nano_models):
    spec = spec_from_hf_dir(nano_models["smolvlm"])
    prompter = Prompter(Path(nano_models["smolvlm"]) / "tokenizer.json", spec)
    ids = prompter.encode_prompt("Is there a nodule?")
    slots = [i for i, t in enumerate(ids.tolist()) if t == spec.image_token_id]
    assert len(slots) == spec.num_image_tokens
    assert prompter.decode(ids[: slots[0]].tolist()) == "User:"
    assert prompter.decode(question_ids(ids, spec.image_token_id).tolist()).startswith("Is there a nodule?")


def test_a_question_first_template_repeats_the_question_after_the_image_where_the_guard_reads_it(nano_models):
    base = spec_from_hf_dir(nano_models["smolvlm"])
    tokenizer = Path(nano_models["smolvlm"]) / "tokenizer.json"
    plain, first = Prompter(tokenizer, base), Prompter(tokenizer, replace(base, prompt_template=QUESTION_FIRST))
    question = "Which side is the mass on?"
    ids = first.encode_prompt(question)
    slots = [i for i, t in enumerate(ids.tolist()) if t == base.image_token_id]
    assert len(slots) == base.num_image_tokens
    assert first.decode(ids[: slots[0]].tolist()).startswith("User:" + question)
    # what the guard reads (the question after the image, and the turn's end) is the default template's
    assert question_ids(ids, base.image_token_id).tolist() == \
        question_ids(plain.encode_prompt(question), base.image_token_id).tolist()


@pytest.mark.parametrize("template", ["{question}{image}", "{image}", "{image}{question}{question}",
                                      "{question}{question}{image}{question}", "{image}{question}{image}"])
def test_a_template_without_one_question_after_its_one_image_is_refused(template):
    with pytest.raises(ValueError, match="must hold"):
        template_parts(template)


def test_a_model_directory_with_a_bad_template_fails_to_load_naming_the_field(nano_models, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(nano_models["smolvlm"], model)
    meta = json.loads((model / META_FILE).read_text())
    (model / META_FILE).write_text(json.dumps({**meta, "prompt_template": "{question} then {image}"}))
    with pytest.raises(ModelLoadError, match="prompt_template"):
        spec_from_hf_dir(model)


def test_a_model_directory_names_the_input_channels_it_was_trained_on(nano_models, tmp_path):
    assert spec_from_hf_dir(nano_models["smolvlm"]).preprocess.channels == "rgb"
    model = tmp_path / "m"
    shutil.copytree(nano_models["smolvlm"], model)
    meta = json.loads((model / META_FILE).read_text())
    (model / META_FILE).write_text(json.dumps({**meta, "image_channels": "lesion-enhance"}))
    assert spec_from_hf_dir(model).preprocess.channels == "lesion-enhance"
    (model / META_FILE).write_text(json.dumps({**meta, "image_channels": "cmyk"}))
    with pytest.raises(ModelLoadError, match="image_channels.*lesion-enhance"):
        spec_from_hf_dir(model)


@pytest.mark.parametrize("family", ["smolvlm", "llava"])
def test_init_model_keeps_its_input_channels_template_and_text_overrides_where_serving_reads_them(tmp_path, family):
    from guard.families import family_for
    from training.init_model import init_model

    model = init_model(family, "nano", tmp_path / "m", corpus_files=[], image_channels="lesion-enhance",
                       text_overrides={"num_key_value_heads": 4}, question_first=True)
    spec = spec_from_hf_dir(model)
    assert spec.preprocess.channels == "lesion-enhance"
    assert spec.prompt_template == family_for(family).QUESTION_FIRST_TEMPLATE
    assert json.loads((model / "config.json").read_text())["text_config"]["num_key_value_heads"] == 4
    ids = Prompter(model / "tokenizer.json", spec).encode_prompt("Is there a mass?")
    assert (ids == spec.image_token_id).sum() == spec.num_image_tokens


def test_init_model_refuses_a_text_override_that_is_not_a_text_config_field(tmp_path):
    from training.init_model import init_model

    with pytest.raises(ValueError, match="num_kv_heads"):
        init_model("smolvlm", "nano", tmp_path / "m", corpus_files=[], text_overrides={"num_kv_heads": 4})
    assert not (tmp_path / "m").exists()


def test_a_split_digits_tokenizer_spells_numbers_digit_by_digit_in_the_file_serving_reads(tmp_path):
    from tokenizers import Tokenizer

    from training.init_model import init_model

    plain = Tokenizer.from_file(str(init_model("smolvlm", "nano", tmp_path / "a", corpus_files=[]) / "tokenizer.json"))
    split = Tokenizer.from_file(str(init_model("smolvlm", "nano", tmp_path / "b", corpus_files=[],
                                               split_digits=True) / "tokenizer.json"))
    text = "The nodule is 23 mm across, 1.5 cm."
    digits = [t for t in split.encode(text).tokens if any(c.isdigit() for c in t)]
    assert digits == ["2", "3", "1", "5"]
    assert split.decode(split.encode(text).ids) == text
    # The plain byte-level BPE keeps " 23" one word, which training can merge into one token.
    assert [w for w, _ in plain.pre_tokenizer.pre_tokenize_str("is 23 mm")] == ["is", "Ġ23", "Ġmm"]
    assert [w for w, _ in split.pre_tokenizer.pre_tokenize_str("is 23 mm")] == ["is", "Ġ", "2", "3", "Ġmm"]
