"""`medhallguard export`: a model directory -> a verified bundle of ONNX graphs and manifest.json.

export_bundle() is the whole story:
  1) load the model with the PyTorch backend (the reference) and its guard heads;
  2) trace vision, embed and decoder (export/wrappers.py) with the legacy or the
     dynamo exporter, at fp32;
  3) quantize them to the asked precision (export/quantize.py);
  4) write head.onnx, copy the tokenizer, preprocessing config and heads, and
     (--engine tensorrt) build TensorRT engines from the fp32 graphs;
  5) hash every file into a provisional manifest, so the bundle can be loaded;
  6) the parity gate: the bundle, served by the onnxruntime backend, against the
     reference (export/parity.py); --force skips it and marks the bundle unverified;
  7) with engines, the same gate for the TensorRT backend;
  8) the final manifest, then rename the temporary directory to OUT_DIR.
Everything is written in a temporary directory next to OUT_DIR; on any failure
it is removed, so OUT_DIR either holds a whole bundle or does not exist.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from export.parity import ParityConfig, ParityError
from export.quantize import INT8_SCHEMES, QuantizeConfig
from guard.errors import GuardError, ModelLoadError
from guard.head import GuardHeads
from guard.manifest import PRECISIONS, GraphInfo, Manifest, TensorInfo, hash_files
from guard.spec import HEADS_FILE, META_FILE, ModelSpec

OPSET = 18
EXPORTERS = ("legacy", "dynamo")
DECODERS = ("fused", "traced")
ENGINES = ("tensorrt",)
GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx", "head": "head.onnx"}
QUANTIZED_GRAPHS = ("vision", "decoder")
"""The embedding graph is one Gather: it stays fp32 at every precision."""
_COPY_FILES = {"tokenizer.json": True, "tokenizer_config.json": False, "preprocessor_config.json": True,
               META_FILE: False, HEADS_FILE: True}  # name -> required
# Example sizes for tracing: none of them 0 or 1, which exporters may specialize on.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 2


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp32"
    """Weights of the vision and decoder graphs: fp32, fp16, int8 or int4."""
    exporter: str = "legacy"
    """`legacy` (TorchScript tracing, opset 18) or `dynamo` (torch.export), the fallback."""
    decoder: str = "fused"
    """`fused`: the decoder written node by node with onnxruntime's fused operators
    (export/decoder_graph.py), for the text models it supports, else traced; `traced`: always traced.
    TensorRT engines (`engine`) are always built from the traced decoder."""
    force: bool = False
    """Skip the parity gate; the manifest then says `verified: false`."""
    engine: str | None = None
    """Also build engines for this runtime (`tensorrt`, on GPU hosts)."""
    parity: ParityConfig = field(default_factory=ParityConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    threads: int = 0
    """Threads for the parity run (torch and onnxruntime); 0 keeps the libraries' defaults."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"`decoder` must be one of {DECODERS}, got {self.decoder!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"`exporter` must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.engine not in (None, *ENGINES):
            raise ValueError(f"`engine` must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "tensorrt" and self.precision == "int4":
            raise ValueError("`engine` tensorrt takes fp32, fp16 or int8: int4 (MatMulNBits) is onnxruntime-only")


def _log(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


def export_bundle(model_dir: str | Path, out_dir: str | Path, precision: str = "fp32", exporter: str = "legacy",
                  force: bool = False, config: ExportConfig | None = None, log=_log) -> Path:
    """Export `model_dir` to the bundle `out_dir` (which must not exist or be empty); -> out_dir.

    Raises ParityError (nothing written) when the bundle does not answer like the model.
    """
    config = config or ExportConfig(precision=precision, exporter=exporter, force=force)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new OUT_DIR or remove it")
    if config.engine == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise ValueError("--engine tensorrt needs TensorRT: install the [gpu] extra on the GPU host that will serve")
    started = time.perf_counter()

    # 1) The reference: the PyTorch backend over the model directory, and its heads.
    from guard.backends import torch_backend

    reference = torch_backend.load(model_dir, threads=config.threads or None)
    heads = GuardHeads.load(model_dir / HEADS_FILE)
    log(f"loaded {model_dir} ({reference.spec.family}, {reference.spec.num_layers} layers) "
        f"in {time.perf_counter() - started:.1f} s")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        # 2-3) fp32 graphs, then the asked precision.
        fp32_dir = tmp if config.precision == "fp32" else tmp / "_fp32"
        fp32_dir.mkdir(exist_ok=True)
        decoder = export_graphs(reference.model, reference.spec, fp32_dir, config.exporter, log,
                                decoder="traced" if config.engine else config.decoder)
        if fp32_dir != tmp:
            _quantize_graphs(fp32_dir, tmp, config.precision, config.quantize, log)
        # 4) Head graph and the files the runtime reads.
        _write_head_graph(heads, tmp / GRAPH_FILES["head"])
        for name, required in _COPY_FILES.items():
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
            elif required:
                raise ModelLoadError(f"{model_dir / name} is missing; the bundle needs it")
        manifest = _manifest(tmp, reference.spec, reference.checksum, config)
        manifest.decoder = decoder
        # TensorRT engines come from the fp32 graphs: TensorRT applies its own precision.
        if config.engine == "tensorrt":
            manifest.engines = _build_engines(reference, fp32_dir, tmp, manifest, config, log)
        if fp32_dir != tmp:
            shutil.rmtree(fp32_dir)
        # 5) A provisional manifest, so the backends can load the bundle for the gate.
        manifest.files = hash_files(tmp)
        manifest.save(tmp)
        # 6-7) The gates.
        if config.force:
            log("--force: parity gate skipped; the bundle is marked unverified")
            manifest.parity = {"skipped": "exported with --force"}
        else:
            manifest.parity = _gate(reference, tmp, heads, config, "onnxruntime", log)
            if manifest.engines:
                manifest.parity = {"onnxruntime": manifest.parity,
                                   "tensorrt": _gate(reference, tmp, heads, config, "tensorrt", log)}
        # 8) The final manifest, then the rename that publishes the bundle.
        manifest.verified = not config.force
        manifest.files = hash_files(tmp)
        manifest.save(tmp)
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(out_dir.rglob("*"))
                      if p.suffix in (".onnx", ".data", ".plan"))
    log(f"wrote {out_dir} ({config.precision}, {'verified' if manifest.verified else 'UNVERIFIED'}) "
        f"in {time.perf_counter() - started:.1f} s: {sizes}")
    return out_dir


# --- 2) tracing ---------------------------------------------------------------


def export_graphs(model, spec: ModelSpec, out: Path, exporter: str, log=_log, decoder: str = "fused") -> str:
    """Write vision.onnx, embed.onnx and decoder.onnx (fp32) for `model` into `out`; -> how the decoder was made.

    decoder "fused" writes the decoder by hand (export/decoder_graph.py) when the text model is one it
    supports, and traces it otherwise; "traced" always traces. Returns "fused" or "traced".
    """
    import torch

    from export import decoder_graph
    from export.wrappers import DecoderWrapper, EmbedWrapper, VisionWrapper, kv_shape

    layers, kv_heads, head_dim = kv_shape(model)
    b, s, p, d, px = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST, spec.hidden_size, spec.preprocess.image_size
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    seq = {0: "batch", 1: "sequence"}
    graphs = {
        "vision": (VisionWrapper(model, px), (torch.zeros(b, 3, px, px),), {"pixel_values": {0: "num_images"}},
                   {"image_features": {0: "num_images", 1: spec.num_image_tokens}}),  # an int: a static dim
        "embed": (EmbedWrapper(model), (torch.zeros(b, s, dtype=torch.long),),
                  {"input_ids": seq}, {"inputs_embeds": seq}),
    }
    why = decoder_graph.supports(model) if decoder == "fused" else "--decoder traced"
    if why is None:
        t = time.perf_counter()
        nodes = decoder_graph.build_decoder(model, spec.mid_layer, out / GRAPH_FILES["decoder"], OPSET)
        log(f"{GRAPH_FILES['decoder']}: written with onnxruntime's fused operators ({nodes} nodes) "
            f"in {time.perf_counter() - t:.1f} s")
    else:
        if decoder == "fused":
            log(f"{GRAPH_FILES['decoder']}: traced, not fused: {why}")
        decoder = "traced"
        graphs["decoder"] = (
            DecoderWrapper(model, spec.mid_layer),
            (torch.randn(b, s, d), torch.ones(b, p + s, dtype=torch.long), torch.arange(p, p + s).repeat(b, 1),
             *(torch.randn(b, kv_heads, p, head_dim) for _ in past)),
            {"inputs_embeds": seq, "attention_mask": {0: "batch", 1: "total_sequence"}, "position_ids": seq,
             **{name: {0: "batch", 2: "past_sequence"} for name in past}},
            {"logits": seq, "hidden_mid": seq, "hidden_last": seq,
             **{name: {0: "batch", 2: "total_sequence"} for name in present}},
        )
    for role, (module, args, in_dims, out_dims) in graphs.items():
        t = time.perf_counter()
        _trace(module.eval(), args, out / GRAPH_FILES[role], in_dims, out_dims, exporter)
        _name_dims(out / GRAPH_FILES[role], {**in_dims, **out_dims})
        log(f"{GRAPH_FILES[role]}: traced with the {exporter} exporter (opset {OPSET}) "
            f"in {time.perf_counter() - t:.1f} s")
    return decoder


def _trace(module, args: tuple, path: Path, in_dims: dict, out_dims: dict, exporter: str) -> None:
    import torch

    names = dict(input_names=list(in_dims), output_names=list(out_dims), opset_version=OPSET)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values: the shapes they freeze are static
        if exporter == "legacy":
            axes = {name: {axis: n for axis, n in d.items() if isinstance(n, str)}
                    for name, d in {**in_dims, **out_dims}.items()}
            torch.onnx.export(module, args, str(path), dynamo=False, dynamic_axes=axes, **names)
        else:
            # dynamo needs dynamic_shapes, shaped like forward's parameters (*past is one tuple), not dynamic_axes.
            dims = [{axis: torch.export.Dim.DYNAMIC for axis in d} for d in in_dims.values()]
            params = inspect.signature(module.forward).parameters.values()
            named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
            dims = (*dims[:named], tuple(dims[named:])) if len(dims) > named else tuple(dims)
            torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=dims, external_data=True,
                              optimize=True, verbose=False, **names)


def _name_dims(path: Path, dims: dict[str, dict[int, str | int]]) -> None:
    """Give the graph's inputs and outputs the dim names (or static sizes) we chose.

    dynamo names dynamic dims s0, s1, ... and the tracer leaves some static dims
    unnamed; the manifest should say `batch`, `past_sequence`, 16. Saved only if
    something changed; external data (dynamo's .data file) stays where it is.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for value in (*model.graph.input, *model.graph.output):
        for axis, want in dims.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if isinstance(want, str) and dim.dim_param != want:
                dim.dim_param, changed = want, True
            elif isinstance(want, int) and dim.dim_value != want:
                dim.dim_value, changed = want, True
    if changed:
        onnx.save(model, str(path))


def _quantize_graphs(src: Path, dst: Path, precision: str, config: QuantizeConfig, log) -> None:
    from export.quantize import quantize_graph

    for role, file in GRAPH_FILES.items():
        if not (src / file).exists():
            continue
        t = time.perf_counter()
        if role in QUANTIZED_GRAPHS:
            quantize_graph(src / file, dst / file, precision, config)
            log(f"{file}: converted to {precision} in {time.perf_counter() - t:.1f} s")
        else:
            for part in src.glob(file + "*"):  # the graph and its .data side file, if any
                shutil.move(part, dst / part.name)


# --- 4-5) head graph and manifest --------------------------------------------


def _write_head_graph(heads: GuardHeads, path: Path) -> None:
    import onnx

    from export.head_graph import heads_to_onnx

    onnx.save(heads_to_onnx(heads, OPSET), str(path))


def describe_graph(path: Path) -> GraphInfo:
    """Names, dtypes and shapes (symbolic dims as names) of a graph's inputs and outputs."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph

    def info(value) -> TensorInfo:
        t = value.type.tensor_type
        shape = tuple(dim.dim_param or dim.dim_value for dim in t.shape.dim)
        return TensorInfo(value.name, helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape)

    initializers = {i.name for i in graph.initializer}
    return GraphInfo(
        file=path.name,
        inputs=tuple(info(v) for v in graph.input if v.name not in initializers),
        outputs=tuple(info(v) for v in graph.output),
    )


def _manifest(bundle: Path, spec: ModelSpec, source_checksum: str, config: ExportConfig) -> Manifest:
    """Everything but the file hashes, the parity report and the verdict."""
    return Manifest(
        graphs={role: describe_graph(bundle / file) for role, file in GRAPH_FILES.items()},
        opset=OPSET,
        precision=config.precision,
        spec=spec.to_dict(),
        source_checksum=source_checksum,
        versions=library_versions(),
        exporter=config.exporter,
        quantization={"int8_scheme": config.quantize.int8_scheme} if config.precision == "int8" else {},
    )


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy", "tensorrt"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def _build_engines(reference, fp32_dir: Path, bundle: Path, manifest: Manifest, config: ExportConfig, log) -> dict:
    from export import parity
    from export.trt_build import build_engines, calibration_inputs
    from guard.prompt import Prompter

    calibration = None
    if config.precision == "int8":
        prompter = Prompter(bundle / "tokenizer.json", reference.spec)
        calibration = calibration_inputs(reference, prompter, parity.parity_prompts(config.parity), manifest)
    return build_engines(fp32_dir, bundle, manifest, config.precision, calibration, log=log)


# --- 6) the gate --------------------------------------------------------------


def _gate(reference, bundle: Path, heads: GuardHeads, config: ExportConfig, runtime: str, log) -> dict:
    """Serve the bundle with `runtime` and compare it with the reference; raises ParityError on failure."""
    from export import parity
    from guard.backends import load_backend
    from guard.prompt import Prompter

    t = time.perf_counter()
    device = "cuda:0" if runtime == "tensorrt" else "cpu"
    candidate = load_backend(runtime, bundle, device=device, threads=config.threads or None)
    prompter = Prompter(bundle / "tokenizer.json", candidate.spec)
    report = parity.compare(reference, candidate, prompter, heads, parity.parity_prompts(config.parity),
                            config.parity.max_new_tokens)
    del candidate  # release the sessions before the directory is renamed
    try:
        report = parity.gate(report, config.precision)
    except ParityError:
        log(f"parity ({runtime}, {config.precision}) FAILED: {parity.summary(report)}")
        raise
    log(f"parity ({runtime}, {config.precision}) passed in {time.perf_counter() - t:.1f} s: {parity.summary(report)}")
    return report


# --- CLI ----------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the model to ONNX graphs plus manifest.json",
        description=(
            "Export a model directory to a bundle that `medhallguard serve --bundle` serves with onnxruntime\n"
            "(no torch): vision.onnx, embed.onnx, decoder.onnx (KV cache), head.onnx, the tokenizer, the\n"
            "preprocessing config, the guard heads and manifest.json (graph I/O, library versions, sha256 of\n"
            "every file, the parity report).\n\n"
            "The parity gate runs fixed phantom and MedHallTune prompts through the bundle and the PyTorch model:\n"
            "  fp32: greedy tokens identical on every prompt, logits within 1e-3 of the logit scale, guard\n"
            "        outputs within 1e-4;\n"
            "  fp16, int8, int4: token agreement >= 90%, the same verdict on >= 98% of prompts.\n"
            "A bundle that fails is not written. The bundle is written to a temporary directory next to\n"
            "OUT_DIR and renamed into place, so OUT_DIR never holds a partial bundle."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "exit status: 0 written, 1 the parity gate failed (nothing written), 2 bad arguments or model\n\n"
            "examples:\n"
            "  medhallguard export runs/smolvlm bundles/smolvlm-fp32\n"
            "  medhallguard export runs/smolvlm bundles/smolvlm-int8 --precision int8\n"
            "  medhallguard export runs/smolvlm bundles/smolvlm-int4 --precision int4 --exporter dynamo\n"
            "  medhallguard serve --bundle bundles/smolvlm-int8"
        ),
    )
    p.add_argument("model_dir", type=Path, help="model directory (save_pretrained layout) with guard_heads.safetensors")
    p.add_argument("out_dir", type=Path, help="bundle directory to create (must not exist or be empty)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights of the vision and decoder graphs (default fp32); fp16 mainly for GPU providers")
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                   help="legacy: TorchScript tracing (default, single files); dynamo: torch.export (fallback)")
    p.add_argument("--decoder", choices=DECODERS, default="fused",
                   help="fused (default): the decoder written with onnxruntime's fused operators (GroupQueryAttention, "
                        "RotaryEmbedding, SkipSimplifiedLayerNormalization), 14 nodes per layer, for Llama-type text "
                        "models (others "
                        "are traced); traced: trace the Hugging Face decoder (any model; slower per token). "
                        "--engine tensorrt always traces (TensorRT does not run onnxruntime's com.microsoft operators)")
    p.add_argument("--int8-scheme", choices=INT8_SCHEMES, default="dynamic",
                   help="int8 only. dynamic (default): int8 weights and activations (quantize_dynamic); "
                        "weight-only: int8 weights, fp32 compute (MatMulNBits), which moves the guard's outputs "
                        "far less: try it when a dynamic int8 bundle fails the parity gate (slow on CPU for "
                        "large models: ~30x dynamic's time per token on the 256M shape)")
    p.add_argument("--force", action="store_true",
                   help="skip the parity gate and mark the bundle unverified (servers warn when they load it)")
    p.add_argument("--engine", choices=ENGINES, help="also build TensorRT engines (GPU hosts with the [gpu] extra)")
    p.add_argument("--parity-prompts", type=int, default=4, metavar="N",
                   help="phantom prompts and MedHallTune prompts each, for the gate (default 4 + 4)")
    p.add_argument("--parity-tokens", type=int, default=16, metavar="N", help="greedy tokens per prompt (default 16)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch and onnxruntime threads for the gate (default: the libraries' own)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    try:
        config = ExportConfig(
            precision=args.precision, exporter=args.exporter, decoder=args.decoder, force=args.force, engine=args.engine,
            parity=ParityConfig(phantom_prompts=args.parity_prompts, medhalltune_prompts=args.parity_prompts,
                                max_new_tokens=args.parity_tokens),
            threads=args.threads, quantize=QuantizeConfig(int8_scheme=args.int8_scheme),
        )
        export_bundle(args.model_dir, args.out_dir, config=config)
    except ParityError as e:
        hint = "; an int8 bundle may pass with --int8-scheme weight-only" \
            if args.precision == "int8" and args.int8_scheme == "dynamic" else ""
        print(f"error: {e}\nnothing was written to {args.out_dir}{hint}; use --force to write an unverified bundle",
              file=sys.stderr)
        return 1
    except (ValueError, FileExistsError, GuardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}; serve it with: medhallguard serve --bundle {args.out_dir}")
    return 0

