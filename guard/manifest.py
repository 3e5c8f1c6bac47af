"""The bundle manifest: what an exported bundle holds, and the check that it is whole.

`export/` writes a bundle directory (the ONNX graphs, guard heads, tokenizer,
preprocessing config and `manifest.json`); every backend that serves a bundle
reads it through `load_manifest`, which refuses a bundle whose files do not
match their recorded sha256. This module knows nothing of onnxruntime, torch
or how the graphs were made: it is plain JSON and hashing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guard.errors import ModelLoadError
from guard.spec import ModelSpec

MANIFEST_FILE = "manifest.json"
FORMAT = "medhallguard-bundle-v1"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
GRAPHS = ("vision", "embed", "decoder", "head")
"""Graph roles. The runtime runs vision, embed and decoder; `head` is for other consumers (e.g. Triton)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    """numpy dtype name: float32, float16, int64."""
    shape: tuple[int | str, ...]
    """Static dims are ints; dynamic dims are symbolic names ("batch", "past_sequence")."""

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class GraphInfo:
    file: str
    """Path of the .onnx (or engine) file, relative to the bundle."""
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)

    @classmethod
    def from_dict(cls, d: dict) -> "GraphInfo":
        return cls(
            file=d["file"],
            inputs=tuple(TensorInfo.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorInfo.from_dict(t) for t in d["outputs"]),
        )


@dataclass
class Manifest:
    graphs: dict[str, GraphInfo]
    """Role (vision, embed, decoder, head) -> graph file and its named inputs and outputs."""
    opset: int
    precision: str
    """fp32, fp16, int8 or int4 (weights; the graphs' inputs and outputs stay float32)."""
    spec: dict
    """`ModelSpec.to_dict()`: token ids, layer indices, prompt template, preprocessing constants."""
    source_checksum: str
    """`dir_checksum` of the model directory the bundle was exported from."""
    versions: dict[str, str]
    """Library versions at export time (torch, transformers, onnx, onnxruntime, ...)."""
    files: dict[str, str] = field(default_factory=dict)
    """Every file of the bundle except manifest.json -> its sha256 hex digest."""
    parity: dict | None = None
    """The parity report of the export gate (export/parity.py), or None if it never ran."""
    verified: bool = False
    """True only when the parity gate ran and passed; `--force` exports are False."""
    exporter: str = "legacy"
    decoder: str = "traced"
    """How decoder.onnx was made: `fused` (written with onnxruntime's fused operators) or `traced`."""
    engines: dict[str, GraphInfo] = field(default_factory=dict)
    """TensorRT engines built from the graphs (role -> engine file), when any."""
    quantization: dict = field(default_factory=dict)
    """How the weights were quantized beyond `precision`, e.g. {"int8_scheme": "weight-only"}; empty
    for fp32, fp16 and int4, and in bundles written before it."""
    format: str = FORMAT

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.spec)

    @property
    def checksum(self) -> str:
        """One id for the bundle's content: sha256 over the sorted (file, sha256) list."""
        listing = "".join(f"{name}\0{digest}\n" for name, digest in sorted(self.files.items()))
        return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["graphs"] = {k: GraphInfo.from_dict(v) for k, v in d["graphs"].items()}
        d["engines"] = {k: GraphInfo.from_dict(v) for k, v in d.get("engines", {}).items()}
        return cls(**d)

    def save(self, bundle_dir: str | Path) -> None:
        (Path(bundle_dir) / MANIFEST_FILE).write_text(self.to_json())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every regular file under `bundle_dir` except the manifest itself."""
    root = Path(bundle_dir)
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE
    }


def is_bundle(path: str | Path) -> bool:
    """A directory that has a manifest, or ONNX graphs (a bundle whose manifest went missing)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST_FILE).exists() or any(path.glob("*.onnx")))


def load_manifest(bundle_dir: str | Path, verify_files: bool = True) -> Manifest:
    """Read manifest.json and check every file it lists against its sha256.

    Raises ModelLoadError naming the file for a missing or corrupt manifest (a
    half-written bundle), a missing file, or a file whose content changed.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise ModelLoadError(f"bundle directory {root} does not exist; pass the OUT_DIR of `medhallguard export`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: this is a half-written or damaged bundle; export it again with `medhallguard export`"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
        manifest = Manifest.from_dict(raw)
        if manifest.precision not in PRECISIONS:
            raise ValueError(f"precision {manifest.precision!r} is not one of {PRECISIONS}")
        missing_roles = [g for g in GRAPHS if g not in manifest.graphs]
        if missing_roles:
            raise ValueError(f"graphs {missing_roles} are not listed")
        manifest.model_spec  # noqa: B018 (validates the spec)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, ModelLoadError) as exc:
        raise ModelLoadError(
            f"{path} is corrupt or truncated ({exc}): this is a half-written or damaged bundle; export it again"
        ) from exc
    listed = {g.file for g in (*manifest.graphs.values(), *manifest.engines.values())}
    unlisted = sorted(listed - set(manifest.files))
    if unlisted:
        raise ModelLoadError(f"{path} names {unlisted[0]} as a graph but has no sha256 for it; export the bundle again")
    if verify_files:
        for name, digest in manifest.files.items():
            _check_file(root, name, digest)
    return manifest


def _check_file(root: Path, name: str, digest: str) -> None:
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ModelLoadError(f"manifest.json lists {name}, which is outside the bundle {root}; refusing to load")
    if not path.is_file():
        raise ModelLoadError(f"bundle file {path} is missing; the bundle is incomplete: export it again")
    actual = file_sha256(path)
    if actual != digest:
        raise ModelLoadError(
            f"bundle file {path} does not match its sha256 in manifest.json (expected {digest[:16]}..., "
            f"got {actual[:16]}...): the file was modified or damaged; export the bundle again"
        )
