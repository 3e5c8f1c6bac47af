"""TensorRT backend: runs the engines that `medhallguard export --engine tensorrt` adds to a bundle.

NOT YET RUN: written against TensorRT 10's documented Python API (execute_async_v3,
named I/O tensors) and cuda-python's runtime bindings, on a machine where
neither can be installed (see ../shared/FINDINGS.md). Its tests skip where
`import tensorrt` fails.

Same calls as the other backends. Host arrays cross the PCIe bus once per call;
the KV cache stays on the GPU: each step's present tensors are the next step's
past, by device pointer. One execution context per engine, so calls are
serialized with a lock (the server's concurrency then queues on the GPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.backends import StepOutput, stack_left_padded
from guard.errors import BackendUnavailableError, ModelLoadError
from guard.manifest import Manifest, load_manifest

_STEP_OUTPUTS = ("logits", "hidden_mid", "hidden_last")


def cudart():
    """cuda-python's runtime module (its import path moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_check(result):
    """cuda-python returns (error, *values); raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


class DeviceTensor:
    """A GPU buffer with a numpy shape and dtype; freed with the object."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = int(cuda_check(cudart().cudaMalloc(max(self.nbytes, 1))))  # an empty past still needs an address

    @classmethod
    def from_host(cls, array: np.ndarray, stream) -> "DeviceTensor":
        array = np.ascontiguousarray(array)
        t = cls(array.shape, array.dtype)
        rt = cudart()
        if t.nbytes:
            kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            cuda_check(rt.cudaMemcpyAsync(t.ptr, array.ctypes.data, t.nbytes, kind, stream))
        cuda_check(rt.cudaStreamSynchronize(stream))  # `array` may be freed once we return
        return t

    def to_host(self, stream) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        rt = cudart()
        if self.nbytes:
            kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            cuda_check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes, kind, stream))
        cuda_check(rt.cudaStreamSynchronize(stream))
        return out

    def __del__(self):
        if getattr(self, "ptr", None):
            cudart().cudaFree(self.ptr)


@dataclass
class TrtCache:
    values: list[DeviceTensor]  # one per past input, in graph order, on the GPU
    length: int


class TrtBackend:
    def __init__(self, bundle_dir: Path, manifest: Manifest, device_index: int = 0):
        import tensorrt as trt

        self.trt = trt
        self.spec = manifest.model_spec
        self.checksum = manifest.checksum
        self.verified = manifest.verified
        rt = cudart()
        cuda_check(rt.cudaSetDevice(device_index))
        self._stream = cuda_check(rt.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines, self._contexts = {}, {}
        for role in ("vision", "embed", "decoder"):
            engine = runtime.deserialize_cuda_engine((bundle_dir / manifest.engines[role].file).read_bytes())
            if engine is None:
                raise ModelLoadError(f"TensorRT cannot load {manifest.engines[role].file}: built for another GPU or "
                                     "TensorRT version? Rebuild it with `medhallguard export --engine tensorrt`")
            self._engines[role], self._contexts[role] = engine, engine.create_execution_context()
        self._lock = threading.Lock()
        self.name = f"tensorrt:cuda:{device_index}"
        graph = manifest.engines["decoder"]
        self._past = [t.name for t in graph.inputs if t.name.startswith("past_key_values.")]
        self._present = [t.name for t in graph.outputs if t.name.startswith("present.")]
        kv = graph.input(self._past[0])
        self._kv_heads, self._head_dim, self._kv_dtype = kv.shape[1], kv.shape[3], np.dtype(kv.dtype)

    def _run(self, role: str, inputs: dict[str, Any], on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        """Inputs: numpy arrays or DeviceTensors. Outputs named in `on_device` stay DeviceTensors."""
        trt, engine, context = self.trt, self._engines[role], self._contexts[role]
        with self._lock:
            staged = {n: v if isinstance(v, DeviceTensor) else DeviceTensor.from_host(v, self._stream)
                      for n, v in inputs.items()}
            for name, t in staged.items():
                context.set_input_shape(name, t.shape)
                context.set_tensor_address(name, t.ptr)
            outputs = {}
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    dtype = trt.nptype(engine.get_tensor_dtype(name))
                    outputs[name] = DeviceTensor(tuple(context.get_tensor_shape(name)), dtype)
                    context.set_tensor_address(name, outputs[name].ptr)
            if not context.execute_async_v3(self._stream):
                raise BackendUnavailableError(f"TensorRT failed to run the {role} engine")
            cuda_check(cudart().cudaStreamSynchronize(self._stream))
            return {n: t if n in on_device else t.to_host(self._stream) for n, t in outputs.items()}

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        out = self._run("vision", {"pixel_values": pixels.astype(np.float32, copy=False)})
        return out["image_features"].astype(np.float32, copy=False)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._run("embed", {"input_ids": ids.astype(np.int64, copy=False)})["inputs_embeds"].astype(np.float32)

    def new_cache(self, batch: int) -> TrtCache:
        shape = (batch, self._kv_heads, 0, self._head_dim)
        return TrtCache([DeviceTensor(shape, self._kv_dtype) for _ in self._past], 0)

    def forward(self, embeds, attention_mask, position_ids, cache: TrtCache) -> tuple[StepOutput, TrtCache]:
        inputs = {
            "inputs_embeds": embeds.astype(np.float32, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
            "position_ids": position_ids.astype(np.int64, copy=False),
            **dict(zip(self._past, cache.values)),
        }
        out = self._run("decoder", inputs, on_device=tuple(self._present))
        step = StepOutput(*(out[name].astype(np.float32, copy=False) for name in _STEP_OUTPUTS))
        return step, TrtCache([out[name] for name in self._present], cache.length + embeds.shape[1])

    def merge_caches(self, caches: list[TrtCache]) -> TrtCache:
        """Through host memory (a batch changes rarely, a step stays on the GPU)."""
        with self._lock:
            host = [[v.to_host(self._stream) for v in c.values] for c in caches]
            values = [stack_left_padded([h[i] for h in host]) for i in range(len(self._past))]
            return TrtCache([DeviceTensor.from_host(v, self._stream) for v in values], max(c.length for c in caches))

    def select_cache(self, cache: TrtCache, rows: list[int], drop: int = 0) -> TrtCache:
        with self._lock:
            values = [v.to_host(self._stream)[rows, :, drop:] for v in cache.values]
            return TrtCache([DeviceTensor.from_host(v, self._stream) for v in values], cache.length - drop)


def load(path: str | Path, device: str = "cuda:0", dtype: str | None = None, threads: int | None = None) -> TrtBackend:
    """Load a bundle's TensorRT engines; every file is checked against manifest.json first."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        raise ModelLoadError(f"TensorRT runs on a GPU: set [backend] device = \"cuda:0\" (got {device!r})")
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("the tensorrt backend needs TensorRT and cuda-python: install the [gpu] extra "
                             "on a GPU host") from exc
    path = Path(path)
    manifest = load_manifest(path)
    if not manifest.engines:
        raise ModelLoadError(f"{path} has no TensorRT engines; export it with `medhallguard export --engine tensorrt` "
                             "on the GPU host that will serve it")
    return TrtBackend(path, manifest, int(index or 0))
