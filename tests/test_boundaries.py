"""Architecture rules that keep the runtime deployable to the edge."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_guard_never_imports_training_export_server_or_grpc():
    offenders = {
        str(p.relative_to(ROOT)): bad
        for p in (ROOT / "guard").rglob("*.py")
        if (bad := _imports(p) & {"training", "export", "server", "grpc", "peft"})
    }
    assert offenders == {}


def test_the_runtime_core_imports_without_torch_or_transformers():
    code = (
        "import sys; import guard.runtime, guard.preprocess, guard.decode, guard.head, guard.policy, guard.prompt; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
