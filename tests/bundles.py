"""Nano export bundles shared by the export and end-to-end tests: each is exported once per session."""

from __future__ import annotations

from pathlib import Path

from export.parity import ParityConfig

FAST_PARITY = ParityConfig(phantom_prompts=2, medhalltune_prompts=2, max_new_tokens=8)
_CACHE: dict[tuple, Path] = {}


def export_nano(tmp_path_factory, model_dir: Path, precision: str = "fp32", exporter: str = "legacy",
                force: bool = False, decoder: str = "fused") -> Path:
    """The bundle of `model_dir` at `precision`, exported on first use (a few seconds for a nano model)."""
    key = (str(model_dir), precision, exporter, force, decoder)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("bundles") / f"{Path(model_dir).name}-{precision}-{exporter}-{decoder}"
        _CACHE[key] = export(model_dir, out, precision=precision, exporter=exporter, force=force, decoder=decoder)
    return _CACHE[key]


def export(model_dir: Path, out: Path, **config) -> Path:
    """export_bundle with the fast parity settings, one thread (the test machine is shared) and no logs."""
    import torch

    from export.onnx_export import ExportConfig, export_bundle

    threads = torch.get_num_threads()  # the torch backend sets the process-wide count; put it back
    try:
        config = ExportConfig(**{"parity": FAST_PARITY, "threads": 1, **config})
        return export_bundle(model_dir, out, config=config, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
