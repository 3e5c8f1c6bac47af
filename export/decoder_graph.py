"""The decoder graph written node by node, with onnxruntime's fused operators, for Llama-type text models.

Tracing a Hugging Face decoder (export/wrappers.py `DecoderWrapper`) gives a
correct graph of ~3,300 nodes for a 30-layer model: per layer, the traced
attention recomputes mask and rotary tables and carries a chain of
Shape/Gather/Unsqueeze/Concat arithmetic. At one token per step the CPU time
then goes to launching nodes rather than reading weights (the latency
benchmark measured 1.6x the bandwidth floor at fp32). This module writes the
same computation directly, 14 nodes per layer:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm (layer 0: RMSNorm, which onnxruntime fuses)
    MatMul, Split                      q, k and v in one packed weight
    RotaryEmbedding x 2                q and k, at the given position_ids
    GroupQueryAttention                KV concat, causal + padding mask, softmax, grouped heads
    MatMul                             o_proj
    SkipSimplifiedLayerNormalization   residual add + RMSNorm
    MatMul, Split, Sigmoid, Mul, Mul   gate and up in one packed weight, SiLU(gate) * up
    MatMul                             down_proj

plus a handful of nodes per step that turn the 2D attention mask into what
GroupQueryAttention takes (every row's length, and an additive bias for
left-padded positions). Inputs, outputs, their names and the KV layout
([B, H_kv, P, head_dim]; present = past ++ new) are exactly those of the traced
graph, so the backends, the batch scheduler and the parity gate do not know
which one they run.

Batches are left-padded (guard/batching.py): every row is given the batch's
full length as its own (`seqlens_k` = total - 1), so GroupQueryAttention
appends new keys after the whole past, as the traced graph does, and its
causal mask lines up; the attention bias removes the padded positions.
Rotary embeddings are applied before GroupQueryAttention rather than inside
it: its own rotary numbers a first prompt's positions by slot (measured:
a left-padded prefill's keys came out rotated by the padding offset), which
breaks every later step of that row.

One limit of GroupQueryAttention on the CPU: a call with several new
positions on top of a past must have batch 1 (onnxruntime says "batch_size
must be 1 when sequence_length > 1 and past context is given"). The runtime
never makes such a call: prompts are prefilled with an empty past, and batched
steps carry one token per row.

com.microsoft operators run on onnxruntime only; TensorRT engines are built
from the traced decoder (export/onnx_export.py picks it when --engine is given).
`supports()` says which text models this builder handles; others are traced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MS = "com.microsoft"


class Unsupported(ValueError):
    """The text model is not one this builder writes; the caller traces it instead."""


def _text_config(model):
    from guard.families import family_for

    return family_for(model.config.model_type).text_model(model).config


def _rope(cfg) -> tuple[float, int]:
    """(theta, head_dim) for default (unscaled) rotary embeddings; raises Unsupported for any other kind."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise Unsupported(f"rope_type {kind!r} (only unscaled rotary embeddings are written by hand)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise Unsupported("no rope_theta in the text config")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise Unsupported(f"partial_rotary_factor {partial}")
    return float(theta), head_dim


def supports(model) -> str | None:
    """None if this builder writes `model`'s decoder; otherwise why not (the caller traces it)."""
    try:
        cfg = _text_config(model)
        if cfg.model_type not in ("llama", "mistral"):
            raise Unsupported(f"text model type {cfg.model_type!r} (llama and mistral are written by hand)")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(cfg, flag, False):
                raise Unsupported(f"{flag}=True")
        if getattr(cfg, "sliding_window", None):
            raise Unsupported("sliding-window attention")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise Unsupported(f"hidden_act {cfg.hidden_act!r}")
        _rope(cfg)
    except Unsupported as e:
        return str(e)
    return None


def build_decoder(model, mid_layer: int, path: str | Path, opset: int) -> int:
    """Write the decoder of `model` (fp32) to `path`; -> its node count. Raises Unsupported (see supports())."""
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    why = supports(model)
    if why:
        raise Unsupported(why)
    from guard.families import family_for

    text = family_for(model.config.model_type).text_model(model)
    cfg = text.config
    theta, head_dim = _rope(cfg)
    n_layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d, eps = cfg.hidden_size, float(cfg.rms_norm_eps)
    if not 0 <= mid_layer <= n_layers:
        raise ValueError(f"mid_layer {mid_layer} is outside 0..{n_layers}")

    def weight(t) -> np.ndarray:
        return t.detach().to("cpu").float().numpy()

    inits: list = []
    nodes: list = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", domain=domain, **attrs))
        return outputs

    # --- once per step: lengths and the padding bias for GroupQueryAttention -------------------
    init("one_i64", np.array(1, np.int64))
    init("zero_f", np.array(0.0, np.float32))
    init("masked_f", np.array(np.finfo(np.float32).min, np.float32))
    node("Shape", ["attention_mask"], ["mask_batch"], start=0, end=1)  # [1]: B
    node("Shape", ["attention_mask"], ["mask_total"], start=1, end=2)  # [1]: T = past + S
    node("Shape", ["inputs_embeds"], ["embeds_seq"], start=1, end=2)  # [1]: S
    node("Cast", ["mask_total"], ["total_i32_1"], to=TensorProto.INT32)
    node("Squeeze", ["total_i32_1"], ["total_sequence_length"])  # scalar int32
    node("Sub", ["mask_total", "one_i64"], ["last_index"])
    node("Expand", ["last_index", "mask_batch"], ["seqlens_i64"])
    node("Cast", ["seqlens_i64"], ["seqlens_k"], to=TensorProto.INT32)  # [B]: every row as long as the batch
    init("bias_axes", np.array([1, 2], np.int64))
    node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL)
    node("Where", ["mask_bool", "zero_f", "masked_f"], ["bias_2d"])  # [B, T]
    node("Unsqueeze", ["bias_2d", "bias_axes"], ["bias_b11t"])  # [B, 1, 1, T]
    init("one_col", np.array([1], np.int64))
    node("Concat", ["mask_batch", "one_col", "embeds_seq", "mask_total"], ["bias_shape"], axis=0)
    node("Expand", ["bias_b11t", "bias_shape"], ["attention_bias"])  # [B, 1, S, T]

    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(cfg.max_position_embeddings, dtype=np.float64)[:, None] * inv_freq[None, :]
    init("cos_cache", np.cos(angles).astype(np.float32))  # [max_pos, head_dim / 2]
    init("sin_cache", np.sin(angles).astype(np.float32))

    # --- layers -----------------------------------------------------------------------------------
    inter = cfg.intermediate_size
    init("gate_up_split", np.array([inter, inter], np.int64))
    init("qkv_split", np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64))
    hidden: list[str] = []  # hidden[k]: the residual stream entering layer k (Hugging Face's hidden_states[k])
    stream, pending = "inputs_embeds", None  # the residual stream, and a branch output not yet added to it
    for i, layer in enumerate(text.layers):
        attn, mlp = layer.self_attn, layer.mlp
        w_in = init(f"layers.{i}.input_norm", weight(layer.input_layernorm.weight))
        if pending is None:
            x = _rms_norm(node, init, stream, w_in, eps, f"layers.{i}.attn_in")
        else:
            x, _, _, stream = node("SkipSimplifiedLayerNormalization", [pending, stream, w_in],
                                   [f"layers.{i}.attn_in", "", "", f"layers.{i}.stream_in"], domain=MS, epsilon=eps)
        hidden.append(stream)
        q_w, k_w, v_w = (weight(attn.q_proj.weight), weight(attn.k_proj.weight), weight(attn.v_proj.weight))
        node("MatMul", [x, init(f"layers.{i}.qkv_proj", np.concatenate([q_w, k_w, v_w]).T)], [f"layers.{i}.qkv"])
        q, k, v = node("Split", [f"layers.{i}.qkv", "qkv_split"], [f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"],
                       axis=-1)
        # Rotary outside the attention op: GroupQueryAttention's own rotary numbers a first prompt's
        # positions by slot, which is wrong for a left-padded row; RotaryEmbedding takes position_ids as given.
        q = node("RotaryEmbedding", [q, "position_ids", "cos_cache", "sin_cache"], [f"layers.{i}.q_rot"],
                 domain=MS, num_heads=heads, interleaved=0)[0]
        k = node("RotaryEmbedding", [k, "position_ids", "cos_cache", "sin_cache"], [f"layers.{i}.k_rot"],
                 domain=MS, num_heads=kv_heads, interleaved=0)[0]
        attended = node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", "", "", "", "attention_bias"],
            [f"layers.{i}.attn", f"present.{i}.key", f"present.{i}.value"],
            domain=MS, num_heads=heads, kv_num_heads=kv_heads, scale=float(attn.scaling),
        )[0]
        node("MatMul", [attended, init(f"layers.{i}.o_proj", weight(attn.o_proj.weight).T)], [f"layers.{i}.attn_out"])
        w_post = init(f"layers.{i}.post_norm", weight(layer.post_attention_layernorm.weight))
        x, _, _, stream = node("SkipSimplifiedLayerNormalization", [f"layers.{i}.attn_out", stream, w_post],
                               [f"layers.{i}.mlp_in", "", "", f"layers.{i}.stream_mid"], domain=MS, epsilon=eps)
        gate_up = np.concatenate([weight(mlp.gate_proj.weight), weight(mlp.up_proj.weight)])
        node("MatMul", [x, init(f"layers.{i}.gate_up_proj", gate_up.T)], [f"layers.{i}.gate_up"])
        gate, up = node("Split", [f"layers.{i}.gate_up", "gate_up_split"], [f"layers.{i}.gate", f"layers.{i}.up"],
                        axis=-1)
        node("Sigmoid", [gate], [f"layers.{i}.gate_sigmoid"])
        node("Mul", [gate, f"layers.{i}.gate_sigmoid"], [f"layers.{i}.gate_silu"])
        node("Mul", [f"layers.{i}.gate_silu", up], [f"layers.{i}.mlp_act"])
        pending = node("MatMul", [f"layers.{i}.mlp_act",
                                  init(f"layers.{i}.down_proj", weight(mlp.down_proj.weight).T)],
                       [f"layers.{i}.mlp_out"])[0]
    w_final = init("final_norm", weight(text.norm.weight))
    node("SkipSimplifiedLayerNormalization", [pending, stream, w_final], ["hidden_last", "", "", "stream_out"],
         domain=MS, epsilon=eps)
    hidden.append("hidden_last")  # Hugging Face's hidden_states[L] is the final norm's output, not the raw stream
    node("Identity", [hidden[mid_layer]], ["hidden_mid"])
    lm_head = model.lm_head.weight if hasattr(model, "lm_head") else text.embed_tokens.weight
    node("MatMul", ["hidden_last", init("lm_head", weight(lm_head).T)], ["logits"])

    # --- the graph's signature: the traced decoder's, name for name -----------------------------
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = ["batch", kv_heads, "past_sequence", head_dim]
    present = ["batch", kv_heads, "total_sequence", head_dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "sequence", d]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
        *(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv)
          for i in range(n_layers) for kind in ("key", "value")),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch", "sequence", lm_head.shape[0]]),
        helper.make_tensor_value_info("hidden_mid", f32, ["batch", "sequence", d]),
        helper.make_tensor_value_info("hidden_last", f32, ["batch", "sequence", d]),
        *(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present)
          for i in range(n_layers) for kind in ("key", "value")),
    ]
    # Element types of every intermediate tensor: onnx's shape inference stops at com.microsoft operators,
    # and the quantizers (export/quantize.py) need to know which tensors are float.
    non_float = {"mask_batch": i64, "mask_total": i64, "embeds_seq": i64, "last_index": i64, "seqlens_i64": i64,
                 "bias_shape": i64, "total_i32_1": TensorProto.INT32, "total_sequence_length": TensorProto.INT32,
                 "seqlens_k": TensorProto.INT32, "mask_bool": TensorProto.BOOL}
    declared = {v.name for v in (*inputs, *outputs)}
    value_info = [helper.make_tensor_value_info(name, non_float.get(name, f32), None)
                  for n in nodes for name in n.output if name and name not in declared]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializer=inits, value_info=value_info)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                                   producer_name="medhallguard", ir_version=10)
    _save(onnx_model, path)
    return len(nodes)


def _rms_norm(node, init, x: str, weight: str, eps: float, out: str) -> str:
    """RMSNorm in standard operators, in the pattern onnxruntime fuses into SimplifiedLayerNormalization when it
    loads the graph (that operator is not in the ONNX standard, so onnx's checker would refuse it here)."""
    two, epsilon, axes = init(f"{out}.two", np.array(2.0, np.float32)), init(f"{out}.eps", np.array(eps, np.float32)), \
        init(f"{out}.axes", np.array([-1], np.int64))
    node("Pow", [x, two], [f"{out}.squared"])
    node("ReduceMean", [f"{out}.squared", axes], [f"{out}.mean"], keepdims=1)
    node("Add", [f"{out}.mean", epsilon], [f"{out}.mean_eps"])
    node("Sqrt", [f"{out}.mean_eps"], [f"{out}.rms"])
    node("Div", [x, f"{out}.rms"], [f"{out}.normalized"])
    return node("Mul", [f"{out}.normalized", weight], [out])[0]


def _save(model, path: Path) -> None:
    """One file below protobuf's 2 GB limit; weights in a .data side file above it."""
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    onnx.save(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=path.name + ".data")
