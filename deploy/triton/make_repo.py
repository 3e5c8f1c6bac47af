"""Turn a MedHallGuard export bundle into an NVIDIA Triton Inference Server model repository.

    python deploy/triton/make_repo.py BUNDLE_DIR REPO_DIR [--prefix medhallguard] [--kind gpu|cpu]

Reads only the bundle's manifest.json (no medhallguard import, standard library
only) and writes, for each graph (vision, embed, decoder, head):

    REPO_DIR/medhallguard_vision/config.pbtxt
    REPO_DIR/medhallguard_vision/1/vision.onnx        (plus any external-data files of the graph)

Input and output names, dtypes and shapes come from the manifest; symbolic
dims become -1. A graph whose inputs and outputs share one dynamic leading
dim and have no other dynamic dim (vision: num_images; head: batch) gets
`max_batch_size` and dynamic batching. The embed and decoder graphs keep
`max_batch_size: 0`: their sequence dims vary per request and the decoder's
KV cache is per-request state that the client passes in and gets back.

Every file the manifest lists must lie inside the bundle (no `../`, absolute
paths or symlinks out), and each graph file is checked against its sha256 in
the manifest before it is copied. The decode loop, the guard heads' inputs and the verdict policy stay
with the client: see deploy/triton/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

FORMAT = "medhallguard-bundle-v1"
ROLES = ("vision", "embed", "decoder", "head")
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}


class BundleError(Exception):
    """The bundle cannot be turned into a repository; the message says why and what to do."""


def load_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{path} is missing: pass the OUT_DIR of `medhallguard export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not readable JSON ({e}); export the bundle again") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [r for r in ROLES if r not in manifest.get("graphs", {})]
    if missing:
        raise BundleError(f"{path} lists no {missing} graph(s); export the bundle again")
    return manifest


def batch_dim(graph: dict) -> str | None:
    """The shared symbolic leading dim, if the graph can be batched by Triton, else None."""
    tensors = [*graph["inputs"], *graph["outputs"]]
    first = {t["shape"][0] if t["shape"] else None for t in tensors}
    if len(first) != 1 or not isinstance(next(iter(first)), str):
        return None
    rest_dynamic = any(isinstance(d, str) for t in tensors for d in t["shape"][1:])
    return None if rest_dynamic else next(iter(first))


def _dims(shape: list) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _tensor(t: dict, batched: bool) -> str:
    if t["dtype"] not in TRITON_TYPES:
        raise BundleError(f"tensor {t['name']!r} has dtype {t['dtype']!r}, which has no Triton type here")
    shape = t["shape"][1:] if batched else t["shape"]
    if not shape:  # a [batch] tensor: Triton wants at least one dim; reshape to the batch alone
        return (f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_TYPES[t["dtype"]]}\n    dims: [ 1 ]\n'
                f"    reshape: {{ shape: [ ] }}\n  }}")
    return f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_TYPES[t["dtype"]]}\n    dims: {_dims(shape)}\n  }}'


def config_pbtxt(name: str, graph: dict, kind: str, instances: int, max_batch_size: int) -> str:
    """The config.pbtxt text of one graph (Triton's ModelConfig in protobuf text format)."""
    batched = batch_dim(graph) is not None and max_batch_size > 0
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f'default_model_filename: "{Path(graph["file"]).name}"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        "input [\n" + ",\n".join(_tensor(t, batched) for t in graph["inputs"]) + "\n]",
        "output [\n" + ",\n".join(_tensor(t, batched) for t in graph["outputs"]) + "\n]",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n  }}\n]",
    ]
    if batched:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}")
    return "\n".join(lines) + "\n"


def make_repo(bundle: Path, repo: Path, prefix: str = "medhallguard", kind: str = "gpu", instances: int = 1,
              max_batch_size: int = 8, verify: bool = True) -> dict[str, Path]:
    """Write the repository; -> {role: model directory}. REPO_DIR may exist; the models' own dirs must not."""
    manifest = load_manifest(bundle)
    files = manifest.get("files", {})
    if Path(prefix).name != prefix or prefix in ("", ".", ".."):
        raise BundleError(f"--prefix {prefix!r} must be a plain name (no '/' or '..'): it names model directories")
    for part in files:  # before anything is written, so a hostile manifest leaves no half-made repository
        _check_inside(bundle, part)
    written = {}
    for role in ROLES:
        graph = manifest["graphs"][role]
        name = f"{prefix}_{role}"
        model_dir = repo / name
        if model_dir.exists():
            raise BundleError(f"{model_dir} already exists; remove it or pick another --prefix")
        # The graph file and its external-data side files (dynamo exports write `<file>.data`).
        parts = sorted(f for f in files if f == graph["file"] or f.startswith(graph["file"] + "."))
        if graph["file"] not in parts:
            raise BundleError(f"manifest.json lists no sha256 for {graph['file']}; export the bundle again")
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True)
        for part in parts:
            src = bundle / part
            if not src.is_file():
                raise BundleError(f"{src} is missing; the bundle is incomplete: export it again")
            if verify and _sha256(src) != files[part]:
                raise BundleError(f"{src} does not match its sha256 in manifest.json; export the bundle again")
            shutil.copy2(src, version_dir / Path(part).name)
        (model_dir / "config.pbtxt").write_text(config_pbtxt(name, graph, kind, instances, max_batch_size))
        written[role] = model_dir
    return written


def _check_inside(bundle: Path, part: str) -> None:
    """Refuse a manifest file name that leaves the bundle (`../x`, an absolute path, a symlink out), as
    guard.manifest's _check_file does: make_repo copies these files, so a hostile manifest could exfiltrate."""
    if not (bundle / part).resolve().is_relative_to(bundle.resolve()):
        raise BundleError(f"manifest.json lists {part!r}, which is outside the bundle {bundle}; refusing to copy it")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="deploy/triton/make_repo.py",
        description="Write a Triton model repository (config.pbtxt + graph files) from a MedHallGuard export bundle.",
        epilog=(
            "examples:\n"
            "  python deploy/triton/make_repo.py bundles/smolvlm-fp16 triton-repo\n"
            "  python deploy/triton/make_repo.py bundles/smolvlm-int8 triton-repo --kind cpu --prefix smolvlm_int8\n"
            "  tritonserver --model-repository=$PWD/triton-repo      # then see deploy/triton/README.md\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, help="bundle directory written by `medhallguard export`")
    p.add_argument("repo", type=Path, help="model repository to write into (created if missing)")
    p.add_argument("--prefix", default="medhallguard", help="model names are PREFIX_vision, ... (default medhallguard)")
    p.add_argument("--kind", choices=sorted(KINDS), default="gpu", help="instance_group kind (default gpu)")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="max_batch_size of the batchable graphs, vision and head (default 8; 0 turns batching off)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the graph files")
    args = p.parse_args(argv)
    if args.instances < 1 or args.max_batch_size < 0:
        p.error("--instances must be >= 1 and --max-batch-size >= 0")
    try:
        written = make_repo(args.bundle, args.repo, args.prefix, args.kind, args.instances, args.max_batch_size,
                            verify=not args.no_verify)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for role, model_dir in written.items():
        print(f"{role:8s} {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
