"""onnxruntime backend: runs an exported bundle's vision, embed and decoder graphs.

The only module in guard/ that imports onnxruntime. It serves without torch or
transformers. The KV cache is never copied between steps: on a GPU provider the
present tensors stay on the device as OrtValues and are bound, as they are, as
the next step's past (I/O binding); on the CPU, `run` already returns numpy
views of onnxruntime's own buffers and takes numpy inputs without a copy, so
plain `run` does the same with less per-call overhead (measured: I/O binding
gained nothing on the CPU). Providers other than the CPU one are used only when
the session reports them active after creation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.backends import StepOutput, stack_left_padded
from guard.errors import ModelLoadError
from guard.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_STEP_OUTPUTS = ("logits", "hidden_mid", "hidden_last")


@dataclass
class OrtCache:
    """The decoder's past: one OrtValue (io_binding) or numpy array per past input, in graph order."""

    values: list[Any]
    length: int


def providers_for(device: str) -> list:
    """`cpu`, `cuda[:N]` or `tensorrt[:N]` -> onnxruntime providers, best first, CPU always last."""
    kind, _, index = device.partition(":")
    opts = {"device_id": int(index or 0)}
    if kind == "cpu":
        return [CPU]
    if kind == "cuda":
        return [(CUDA, opts), CPU]
    if kind == "tensorrt":
        return [(TENSORRT, opts), (CUDA, opts), CPU]
    raise ValueError(f"`backend.device` for onnxruntime must be cpu, cuda[:N] or tensorrt[:N], got {device!r}")


class OrtBackend:
    def __init__(self, bundle_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 io_binding: bool | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.manifest = manifest
        self.spec = manifest.model_spec
        self.checksum = manifest.checksum
        self.verified = manifest.verified
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        wanted = providers_for(device)
        self._vision, self._embed, self._decoder = (
            self._session(bundle_dir, manifest.graphs[role].file, options, wanted)
            for role in ("vision", "embed", "decoder")
        )
        active = self._decoder.get_providers()[0]
        requested = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
        if active != requested:
            log.warning("onnxruntime: %s was requested but is not active (missing libraries or GPU?); serving on %s",
                        requested, active)
        if active in (CUDA, TENSORRT) and manifest.decoder == "fused" and manifest.precision != "fp16":
            log.warning("onnxruntime: this bundle's decoder is the fused one at %s; onnxruntime's GPU kernel for "
                        "GroupQueryAttention takes fp16/bf16, so its attention may run on the CPU: export with "
                        "--precision fp16 (or --decoder traced) for %s", manifest.precision, active)
        self.name = f"onnxruntime:{active}"
        self._device = ("cuda", int(device.partition(":")[2] or 0)) if active in (CUDA, TENSORRT) else ("cpu", 0)
        self.io_binding = self._device[0] == "cuda" if io_binding is None else io_binding

        graph = manifest.graphs["decoder"]
        self._past = [t.name for t in graph.inputs if t.name.startswith("past_key_values.")]
        self._present = [t.name for t in graph.outputs if t.name.startswith("present.")]
        assert len(self._past) == len(self._present) == 2 * self.spec.num_layers, "one key and value per layer"
        kv = graph.input(self._past[0])
        self._kv_heads, self._head_dim = kv.shape[1], kv.shape[3]
        self._kv_dtype = np.dtype(kv.dtype)
        self._embeds_dtype = np.dtype(graph.input("inputs_embeds").dtype)
        self._pixels_dtype = np.dtype(manifest.graphs["vision"].input("pixel_values").dtype)

    def _session(self, root: Path, file: str, options, wanted):
        available = set(self.ort.get_available_providers())
        providers = [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]
        try:
            return self.ort.InferenceSession(str(root / file), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"onnxruntime cannot load {root / file}: {exc}") from exc

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        out = self._vision.run(["image_features"], {"pixel_values": pixels.astype(self._pixels_dtype, copy=False)})[0]
        return out.astype(np.float32, copy=False)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        out = self._embed.run(["inputs_embeds"], {"input_ids": ids.astype(np.int64, copy=False)})[0]
        return out.astype(np.float32, copy=False)

    def new_cache(self, batch: int) -> OrtCache:
        shape = (batch, self._kv_heads, 0, self._head_dim)
        if not self.io_binding:
            return OrtCache([np.zeros(shape, self._kv_dtype) for _ in self._past], 0)
        kind, index = self._device
        empty = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, kind, index)
        return OrtCache([empty] * len(self._past), 0)

    def forward(self, embeds, attention_mask, position_ids, cache: OrtCache) -> tuple[StepOutput, OrtCache]:
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, self._embeds_dtype),
            "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
            "position_ids": np.ascontiguousarray(position_ids, np.int64),
        }
        assert feeds["attention_mask"].shape[1] == cache.length + embeds.shape[1], "mask covers past + new positions"
        if self.io_binding:
            step, presents = self._run_bound(feeds, cache)
        else:
            outs = self._decoder.run([*_STEP_OUTPUTS, *self._present], {**feeds, **dict(zip(self._past, cache.values))})
            step, presents = outs[:3], outs[3:]
        logits, mid, last = (a.astype(np.float32, copy=False) for a in step)
        cache = OrtCache(presents, cache.length + embeds.shape[1])
        return StepOutput(logits=logits, hidden_mid=mid, hidden_last=last), cache

    def merge_caches(self, caches: list[OrtCache]) -> OrtCache:
        values = [stack_left_padded([self._host(c.values[i]) for c in caches]) for i in range(len(self._past))]
        return OrtCache([self._placed(v) for v in values], max(c.length for c in caches))

    def select_cache(self, cache: OrtCache, rows: list[int], drop: int = 0) -> OrtCache:
        values = [np.ascontiguousarray(self._host(v)[rows, :, drop:]) for v in cache.values]
        return OrtCache([self._placed(v) for v in values], cache.length - drop)

    def _host(self, value) -> np.ndarray:
        return value.numpy() if self.io_binding else value

    def _placed(self, array: np.ndarray):
        """A cache tensor where forward() expects it: numpy on the CPU path, an OrtValue on the device otherwise."""
        return self.ort.OrtValue.ortvalue_from_numpy(array, *self._device) if self.io_binding else array

    def _run_bound(self, feeds: dict, cache: OrtCache) -> tuple[list[np.ndarray], list]:
        """Presents stay OrtValues on the session's device; only logits and hidden states come back to numpy."""
        binding = self._decoder.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self._past, cache.values):
            binding.bind_ortvalue_input(name, value)
        for name in _STEP_OUTPUTS:
            binding.bind_output(name, "cpu")
        kind, index = self._device
        for name in self._present:
            binding.bind_output(name, kind, index)
        self._decoder.run_with_iobinding(binding)
        outs = binding.get_outputs()  # in binding order
        return [v.numpy() for v in outs[:3]], list(outs[3:])


def load(path: str | Path, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
         io_binding: bool | None = None) -> OrtBackend:
    """Load a bundle; every file is checked against manifest.json first.

    `dtype` is ignored (the bundle has its precision); `io_binding` None: on for GPU providers only.
    """
    path = Path(path)
    manifest = load_manifest(path)
    return OrtBackend(path, manifest, device=device, threads=threads, io_binding=io_binding)
