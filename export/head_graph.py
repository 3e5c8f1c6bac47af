"""The guard heads (guard.head.GuardHeads) as one ONNX graph, for consumers other than our runtime.

Our runtime scores in numpy from guard_heads.safetensors; a Triton ensemble or
another language reads head.onnx instead. Both compute the same thing:

  answer_features [N, 4D+5] -> answer_logits [N, 5] (p_hallucination logit, 4 score logits),
                               p_hallucination [N], scores [N, 4] (1-10)
  prompt_features [N, 2D]   -> premise_logits [N, 1], premise_risk [N]
  (+ question_ngrams [N, V])     (an input only when the premise head reads question n-grams)

Features as `guard.head.answer_features` / `prompt_features`, and `GuardHeads.premise_ngrams`
(the question's token-id TF-IDF, heads format v3), computed outside the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from guard.head import GuardHeads, LinearHead, MLPHead

INPUTS = ("answer_features", "prompt_features", "question_ngrams")
"""question_ngrams only for heads with `premise_ngrams`."""
OUTPUTS = ("answer_logits", "premise_logits", "p_hallucination", "premise_risk", "scores")


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


def _standardize(b: _Builder, x: str, head, p: str) -> str:
    return b.op("Div", [b.op("Sub", [x, b.const(f"{p}.mean", _f32(head.mean))], f"{p}/centered"),
                        b.const(f"{p}.std", _f32(head.std))], f"{p}/standardized")


def _linear(b: _Builder, x: str, head: LinearHead, p: str) -> str:
    """standardize -> Linear, as LinearHead."""
    z = _standardize(b, x, head, p)
    return b.op("Add", [b.op("MatMul", [z, b.const(f"{p}.w", _f32(head.w))], f"{p}/mm"),
                        b.const(f"{p}.b", _f32(head.b))], f"{p}/out")


def _mlp(b: _Builder, x: str, head: MLPHead, p: str) -> str:
    """standardize -> Linear -> GELU (tanh form, as MLPHead) -> Linear."""
    f32 = _f32
    z = _standardize(b, x, head, p)
    h = b.op("Add", [b.op("MatMul", [z, b.const(f"{p}.w1", f32(head.w1))], f"{p}/mm1"),
                     b.const(f"{p}.b1", f32(head.b1))], f"{p}/h")
    cube = b.op("Mul", [b.op("Mul", [h, h], f"{p}/h2"), h], f"{p}/h3")
    inner = b.op("Add", [h, b.op("Mul", [cube, b.const(f"{p}.c1", np.float32(0.044715))], f"{p}/ch3")], f"{p}/inner")
    t = b.op("Tanh", [b.op("Mul", [inner, b.const(f"{p}.c0", np.float32(0.7978845608))], f"{p}/arg")], f"{p}/tanh")
    one_plus = b.op("Add", [t, b.const(f"{p}.one", np.float32(1.0))], f"{p}/1pt")
    g = b.op("Mul", [b.op("Mul", [h, b.const(f"{p}.half", np.float32(0.5))], f"{p}/halfh"), one_plus], f"{p}/gelu")
    return b.op("Add", [b.op("MatMul", [g, b.const(f"{p}.w2", f32(head.w2))], f"{p}/mm2"),
                        b.const(f"{p}.b2", f32(head.b2))], f"{p}/out")


def heads_to_onnx(heads: GuardHeads, opset: int = 18) -> onnx.ModelProto:
    b = _Builder()
    answer_in, prompt_in = heads.feature_sizes()
    h = _mlp(b, "answer_features", heads.hallucination, "hallucination")
    s = _linear(b, "answer_features", heads.scores, "scores")
    a = b.op("Concat", [h, s], "answer/logits", axis=1)
    ngrams = heads.premise_ngrams
    premise_in = "prompt_features" if ngrams is None else \
        b.op("Concat", ["prompt_features", "question_ngrams"], "premise/features", axis=1)
    p = _linear(b, premise_in, heads.premise, "premise")
    b.op("Identity", [a], "answer_logits")
    b.op("Identity", [p], "premise_logits")
    # p_hallucination = sigmoid(a[:, 0] / T_answer); premise_risk = sigmoid(p[:, 0] / T_premise)
    col0 = b.const("col0", np.array(0, np.int64))
    a0 = b.op("Gather", [a, col0], "answer/logit0", axis=1)
    p0 = b.op("Gather", [p, col0], "premise/logit0", axis=1)
    b.op("Sigmoid", [b.op("Div", [a0, b.const("answer.temperature", np.float32(heads.answer_temperature))],
                          "answer/tempered")], "p_hallucination")
    b.op("Sigmoid", [b.op("Div", [p0, b.const("premise.temperature", np.float32(heads.premise_temperature))],
                          "premise/tempered")], "premise_risk")
    # scores = 1 + 9 * sigmoid(a[:, 1:5])
    s = b.op("Slice", [a, b.const("s.start", np.array([1], np.int64)), b.const("s.end", np.array([5], np.int64)),
                       b.const("s.axes", np.array([1], np.int64))], "answer/score_logits")
    nine = b.op("Mul", [b.op("Sigmoid", [s], "answer/score_sig"), b.const("nine", np.float32(9.0))], "answer/score9")
    b.op("Add", [nine, b.const("one", np.float32(1.0))], "scores")

    n = "batch"
    graph = helper.make_graph(
        b.nodes,
        "guard_heads",
        inputs=[helper.make_tensor_value_info("answer_features", TensorProto.FLOAT, [n, answer_in]),
                helper.make_tensor_value_info("prompt_features", TensorProto.FLOAT, [n, prompt_in])]
        + ([] if ngrams is None else
           [helper.make_tensor_value_info("question_ngrams", TensorProto.FLOAT, [n, len(ngrams)])]),
        outputs=[helper.make_tensor_value_info("answer_logits", TensorProto.FLOAT, [n, 1 + heads.scores.w.shape[1]]),
                 helper.make_tensor_value_info("premise_logits", TensorProto.FLOAT, [n, heads.premise.w.shape[1]]),
                 helper.make_tensor_value_info("p_hallucination", TensorProto.FLOAT, [n]),
                 helper.make_tensor_value_info("premise_risk", TensorProto.FLOAT, [n]),
                 helper.make_tensor_value_info("scores", TensorProto.FLOAT, [n, 4])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="medhallguard")
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases older than the onnx package
    onnx.checker.check_model(model)
    return model
