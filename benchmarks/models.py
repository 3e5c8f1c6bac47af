"""The models and bundles the benchmarks run: found in the cache, or built there once.

- `default`: the default model (`medhallguard build-default`,
  ~/.cache/medhallguard/models/default). If it has not been built, the nano
  random-init model stands in, and the run says so.
- `nano`, `256m`: random-init SmolVLM models (`medhallguard init-model`);
  `256m` has the shape of SmolVLM-256M. Their answers mean nothing, but every
  byte of weights is read per token exactly as in a trained model.
- any other name must be given as NAME=PATH (a model directory).

Bundles are exported with `--force` (no parity gate: benchmarks/parity.py
measures parity itself, and the gate cannot pass at int8 on random weights)
into ~/.cache/medhallguard/bench/bundles/<name>-<model checksum>-<precision>,
so a rebuilt model gets new bundles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import say

BUILT_IN = ("default", "nano", "256m")


@dataclass(frozen=True)
class Model:
    label: str
    """What the report calls it: default, nano, 256m or the NAME of NAME=PATH."""
    path: Path
    note: str = ""
    """Said in the report, e.g. that the nano model stood in for a default model not built yet."""


def cache_dir() -> Path:
    from training.build_default import cache_root

    return cache_root() / "bench"


def resolve(spec: str) -> Model:
    """`default`, `nano`, `256m` or NAME=PATH -> a model directory that exists (built if it is a random-init one)."""
    from guard.spec import HEADS_FILE

    if "=" in spec:
        label, _, path = spec.partition("=")
        path = Path(path).expanduser()
        if not (path / "config.json").is_file() and not (path / "manifest.json").is_file():
            raise SystemExit(f"error: {path} is neither a model directory (config.json) nor a bundle (manifest.json)")
        return Model(label, path)
    if spec == "default":
        from training.build_default import default_model_dir

        from training.build_default import heads_are_current

        path = default_model_dir()
        if heads_are_current(path):
            return Model("default", path)
        nano = resolve("nano")
        why = (f"its guard heads at {path} are an older format; `medhallguard build-default --heads-only` refits them"
               if (path / HEADS_FILE).is_file() else f"{path} is missing; `make build-default` builds it")
        note = f"the default model is not usable yet ({why}), so the nano random-init model stood in for it"
        say(note)
        return Model("default", nano.path, note)
    if spec in ("nano", "256m"):
        path = cache_dir() / f"smolvlm-{spec}-init"
        if not (path / HEADS_FILE).is_file():
            from training.init_model import init_model

            say(f"writing the random-init {spec} model to {path} (once)")
            init_model("smolvlm", spec, path, seed=0)
        note = "random weights (its answers mean nothing)" + (", the shape of SmolVLM-256M" if spec == "256m" else "")
        return Model(spec, path, note)
    raise SystemExit(f"error: unknown model {spec!r}; use one of {BUILT_IN} or NAME=PATH")


def parse_bundles(items: list[str]) -> dict[tuple[str, str], Path]:
    """`--bundle MODEL:PRECISION=DIR` values -> {(model label, precision): DIR}."""
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        label, _, precision = key.partition(":")
        if not sep or not label or not precision:
            raise SystemExit(f"error: --bundle takes MODEL:PRECISION=DIR, got {item!r}")
        out[(label, precision)] = Path(path)
    return out


def bundle(model: Model, precision: str, threads: int = 0, given: dict | None = None, decoder: str = "fused") -> Path:
    """The export bundle of `model` at `precision` (fp32, int8, int4, fp16) with a `decoder` graph that is
    `fused` (the export's default) or `traced`: `given` (from --bundle, fused only), or exported once into
    the cache."""
    from guard.manifest import MANIFEST_FILE

    if given and decoder == "fused" and (model.label, precision) in given:
        return given[(model.label, precision)]
    from guard.spec import dir_checksum

    checksum = dir_checksum(model.path).removeprefix("sha256:")[:12]
    out = cache_dir() / "bundles" / f"{model.path.name}-{checksum}-{precision}-{decoder}"
    if (out / MANIFEST_FILE).is_file():
        return out
    from export.onnx_export import ExportConfig, export_bundle

    say(f"exporting {model.label} to a {precision} bundle at {out} (once; no parity gate: see benchmarks/parity.py)")
    export_bundle(model.path, out, config=ExportConfig(precision=precision, decoder=decoder, force=True,
                                                       threads=threads),
                  log=lambda m: say(f"  {m}"))
    return out
