"""TensorRT engines from a bundle's ONNX graphs, for GPU hosts (`medhallguard export --engine tensorrt`).

NOT YET RUN: written against TensorRT 10's documented Python API on machines
where TensorRT cannot be installed (its PyPI package downloads the real wheel
from NVIDIA's index; see ../shared/FINDINGS.md). Its tests skip where
`import tensorrt` fails.

Engines are built from the fp32 ONNX graphs (TensorRT picks its own kernels and
precisions), one optimization profile each, with the dynamic dims taken from
the manifest's symbolic dim names:
  batch, num_images: 1 .. max_batch / max_images
  sequence, total_sequence: 1 .. max_sequence (optimized for opt_sequence)
  past_sequence: 0 .. max_sequence - 1
Precision flags: fp16 -> FP16; int8 -> INT8 (+FP16 fallback), calibrated with
an entropy calibrator on the parity prompts' inputs. TensorRT 10.1 deprecated
that implicit calibration in favour of Q/DQ graphs; it still builds. int4
(MatMulNBits) is an onnxruntime contrib op that TensorRT's parser does not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.batching import BatchingConfig
from guard.manifest import GraphInfo, Manifest

ENGINE_DIR = "engines"
ROLES = ("vision", "embed", "decoder")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = BatchingConfig().max_batch_size
    """Largest batch in the profiles: the batch scheduler decodes up to `batching.max_batch_size`
    sequences per call, so an engine built for less would fail under concurrent load."""
    max_images: int = BatchingConfig().max_batch_size
    """Largest vision batch: the scheduler encodes all newcomers' images in one call."""
    max_sequence: int = 2048
    """Longest prompt + answer, in tokens."""
    opt_sequence: int = 256
    """The length TensorRT tunes its kernels for."""
    workspace_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if not 1 <= self.opt_sequence <= self.max_sequence:
            raise ValueError("`opt_sequence` must be between 1 and `max_sequence`")


def profile_shapes(graph: GraphInfo, config: EngineConfig) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min, opt, max) shapes, from the graph's symbolic dim names."""
    ranges = {
        "batch": (1, 1, config.max_batch),
        "num_images": (1, 1, config.max_images),
        "sequence": (1, config.opt_sequence, config.max_sequence),
        "total_sequence": (1, config.opt_sequence, config.max_sequence),
        "past_sequence": (0, config.opt_sequence, config.max_sequence - 1),
    }
    shapes = {}
    for t in graph.inputs:
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in t.shape]
        shapes[t.name] = tuple(tuple(d[k] for d in dims) for k in range(3))
    return shapes


def build_engines(onnx_dir: Path, bundle: Path, manifest: Manifest, precision: str,
                  calibration: dict[str, list[dict[str, np.ndarray]]] | None = None,
                  config: EngineConfig = EngineConfig(), log=print) -> dict[str, GraphInfo]:
    """Build engines/{role}.plan in `bundle` from the fp32 graphs in `onnx_dir`; -> manifest entries."""
    import tensorrt as trt

    if precision == "int4":
        raise ValueError("TensorRT engines are built at fp32, fp16 or int8; int4 (MatMulNBits) is onnxruntime-only")
    if precision == "int8" and not calibration:
        raise ValueError("an int8 TensorRT build needs calibration inputs")
    logger = trt.Logger(trt.Logger.WARNING)
    (bundle / ENGINE_DIR).mkdir(exist_ok=True)
    engines = {}
    for role in ROLES:
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_dir / manifest.graphs[role].file)):  # reads .data side files too
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {manifest.graphs[role].file}: {errors}")
        builder_config = builder.create_builder_config()
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(manifest.graphs[role], config).items():
            profile.set_shape(name, lo, opt, hi)
        builder_config.add_optimization_profile(profile)
        if precision in ("fp16", "int8"):
            builder_config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8" and role != "embed":  # the embedding is a gather: nothing to calibrate
            builder_config.set_flag(trt.BuilderFlag.INT8)
            builder_config.int8_calibrator = _calibrator(trt, calibration[role], bundle / ENGINE_DIR / f"{role}.calib")
            builder_config.set_calibration_profile(profile)
        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build the {role} engine (see its log above)")
        file = f"{ENGINE_DIR}/{role}.plan"
        (bundle / file).write_bytes(serialized)
        engines[role] = GraphInfo(file=file, inputs=manifest.graphs[role].inputs, outputs=manifest.graphs[role].outputs)
        log(f"{file}: built ({precision}), {len(serialized) / 1e6:.1f} MB")
    return engines


def calibration_inputs(reference, prompter, prompts, manifest: Manifest) -> dict[str, list[dict[str, np.ndarray]]]:
    """Prefill inputs of the parity prompts, computed by the reference backend, for the int8 calibrator."""
    from guard import decode
    from guard.preprocess import preprocess

    spec = reference.spec
    pasts = {t.name: (1, t.shape[1], 0, t.shape[3]) for t in manifest.graphs["decoder"].inputs
             if t.name.startswith("past_key_values.")}
    feeds: dict[str, list] = {role: [] for role in ROLES}
    for prompt in prompts:
        pixels = preprocess(prompt.image, "image/png", spec.preprocess)[None]
        ids = prompter.encode_prompt(prompt.question)
        features = reference.encode_image(pixels)
        embeds = decode.splice_image(reference.embed(ids[None]), ids, features, spec.image_token_id)
        n = embeds.shape[1]
        feeds["vision"].append({"pixel_values": pixels})
        feeds["embed"].append({"input_ids": ids[None]})
        feeds["decoder"].append({"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64),
                                 "position_ids": np.arange(n, dtype=np.int64)[None],
                                 **{name: np.zeros(shape, np.float32) for name, shape in pasts.items()}})
    return feeds


def _calibrator(trt, feeds: list[dict[str, np.ndarray]], cache_path: Path):
    """An IInt8EntropyCalibrator2 that serves `feeds` one at a time (batch size 1)."""
    from guard.backends.trt_backend import DeviceTensor, cuda_check, cudart

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.pending = iter(feeds)
            self.stream = cuda_check(cudart().cudaStreamCreate())
            self.live: list[DeviceTensor] = []  # keeps the current batch's buffers alive

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            feed = next(self.pending, None)
            if feed is None:
                return None
            self.live = [DeviceTensor.from_host(feed[name], self.stream) for name in names]
            return [t.ptr for t in self.live]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

    return Calibrator()
