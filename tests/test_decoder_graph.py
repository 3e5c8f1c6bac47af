"""The hand-written decoder graph (export/decoder_graph.py): the traced decoder's signature and numbers,
on the batches the runtime feeds it, in a fraction of the nodes; and the fallback to tracing."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs the [export] extra (torch, transformers, onnx)")
pytest.importorskip("onnx", reason="export needs the [export] extra (torch, transformers, onnx)")

from export import decoder_graph  # noqa: E402
from guard.manifest import load_manifest  # noqa: E402
from tests.bundles import export, export_nano  # noqa: E402
from tests.conftest import FAMILIES  # noqa: E402


def _session(bundle):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle / "decoder.onnx"), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_decoder_has_the_traced_signature_in_far_fewer_nodes(tmp_path_factory, nano_models, family):
    import onnx

    fused = export_nano(tmp_path_factory, nano_models[family])
    traced = export_nano(tmp_path_factory, nano_models[family], decoder="traced")
    mf, mt = load_manifest(fused), load_manifest(traced)
    assert (mf.decoder, mt.decoder) == ("fused", "traced") and mf.verified and mt.verified
    assert mf.graphs["decoder"] == mt.graphs["decoder"]  # names, dtypes and dim names, input for input
    nodes = {name: len(onnx.load(str(b / "decoder.onnx"), load_external_data=False).graph.node)
             for name, b in (("fused", fused), ("traced", traced))}
    layers = mf.model_spec.num_layers
    assert nodes["fused"] <= 14 * layers + 25 < nodes["traced"] / 2
    assert "GroupQueryAttention" in {n.op_type for n in onnx.load(str(fused / "decoder.onnx")).graph.node}


def test_the_fused_decoder_computes_the_traced_one_on_left_padded_batches_with_a_cache(tmp_path_factory,
                                                                                       nano_models):
    """What the batch scheduler feeds: a left-padded prefill of 3 rows, then one-token steps on the merged cache."""
    fused = _session(export_nano(tmp_path_factory, nano_models["smolvlm"]))
    traced = _session(export_nano(tmp_path_factory, nano_models["smolvlm"], decoder="traced"))
    past_inputs = [i for i in fused.get_inputs() if i.name.startswith("past_key_values.")]
    _, heads, _, head_dim = past_inputs[0].shape
    width = fused.get_inputs()[0].shape[2]
    rng = np.random.default_rng(0)
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = mask[2, :4] = 0  # rows of 6, 4 and 2 real tokens
    position_ids = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    embeds = rng.standard_normal((3, 6, width), np.float32)
    past = {i.name: np.zeros((3, heads, 0, head_dim), np.float32) for i in past_inputs}
    caches = {"fused": past, "traced": past}
    for step in range(4):
        outs = {}
        for name, session in (("fused", fused), ("traced", traced)):
            feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids, **caches[name]}
            result = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            outs[name] = result
            caches[name] = {k.replace("present.", "past_key_values."): v for k, v in result.items()
                            if k.startswith("present.")}
        real = mask[:, -embeds.shape[1]:] == 1  # padded query rows are never read
        for key in ("logits", "hidden_mid", "hidden_last"):
            a, b = outs["fused"][key], outs["traced"][key]
            assert np.abs(a - b)[real].max() <= 1e-4 * max(1.0, np.abs(b).max()), (step, key)
        assert outs["fused"]["present.0.key"].shape == (3, heads, mask.shape[1], head_dim)
        embeds = rng.standard_normal((3, 1, width), np.float32)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        position_ids = position_ids[:, -1:] + 1


def test_a_text_model_the_builder_does_not_write_is_traced_and_the_manifest_says_so(tmp_path, nano_models,
                                                                                  monkeypatch):
    monkeypatch.setattr(decoder_graph, "supports", lambda model: "rope_type 'yarn' (only unscaled ...)")
    m = load_manifest(export(nano_models["smolvlm"], tmp_path / "bundle"))
    assert m.decoder == "traced" and m.verified


def test_supports_names_what_it_cannot_write(nano_models):
    from guard.backends import torch_backend

    model = torch_backend.load(nano_models["smolvlm"], threads=1).model
    assert decoder_graph.supports(model) is None
    text = model.model.text_model.config
    text.rope_parameters = {**text.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert "rope_type 'linear'" in decoder_graph.supports(model)
    with pytest.raises(decoder_graph.Unsupported, match="linear"):
        decoder_graph.build_decoder(model, 1, "/nonexistent/decoder.onnx", 18)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_hidden_mid_is_hugging_face_hidden_states_at_any_layer(nano_models, tmp_path, where):
    """hidden_states[0] is the embeddings, [k] the stream after layer k-1, and [L] the final norm's output."""
    import onnxruntime as ort
    import torch

    from export.wrappers import DecoderWrapper, kv_shape
    from guard.backends import torch_backend

    model = torch_backend.load(nano_models["smolvlm"], threads=1).model
    layers, heads, head_dim = kv_shape(model)
    mid = {"first": 0, "middle": layers // 2, "last": layers}[where]
    decoder_graph.build_decoder(model, mid, tmp_path / "decoder.onnx", 18)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    embeds = np.random.default_rng(1).standard_normal((1, 4, model.config.text_config.hidden_size), np.float32)
    mask, positions = np.ones((1, 4), np.int64), np.arange(4)[None]
    past = np.zeros((1, heads, 0, head_dim), np.float32)
    got = session.run(["hidden_mid"], {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                       **{f"past_key_values.{i}.{k}": past for i in range(layers)
                                          for k in ("key", "value")}})[0]
    with torch.no_grad():
        want = DecoderWrapper(model, mid)(torch.from_numpy(embeds), torch.from_numpy(mask), torch.from_numpy(positions),
                                          *[torch.from_numpy(past)] * (2 * layers))[1].numpy()
    assert np.abs(got - want).max() <= 1e-5
