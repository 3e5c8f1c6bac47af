"""The committed stubs in server/pb/ are exactly what `python -m server.codegen` makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server import codegen

pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) generates the stubs")


@pytest.mark.timeout(60)
def test_regenerated_stubs_are_byte_identical_to_committed_ones(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in codegen.generate(tmp_path)}
    committed = {
        p.relative_to(codegen.PB_DIR): p.read_bytes()
        for p in codegen.PB_DIR.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi") and p.parent != codegen.PB_DIR
    }
    assert sorted(fresh) == sorted(committed), "stale or missing stubs: run `python -m server.codegen`"
    stale = [str(rel) for rel in fresh if fresh[rel] != committed[rel]]
    assert not stale, f"{stale} differ from proto/: run `python -m server.codegen` and commit the result"


@pytest.mark.timeout(60)
def test_stubs_import_from_any_working_directory(tmp_path):
    repo = Path(codegen.__file__).resolve().parent.parent
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from server.pb.medhallguard.v1 import guard_pb2, guard_pb2_grpc\n"
        "assert 'medhallguard' not in sys.modules, 'stubs must not need proto/ on sys.path'\n"
        "print(guard_pb2.DESCRIPTOR.services_by_name['MedHallGuard'].full_name)\n" % str(repo)
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "medhallguard.v1.MedHallGuard"


def test_proto_names_follow_the_style_guide():
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    assert pb.DESCRIPTOR.package == "medhallguard.v1"
    assert pb.Verdict.Name(0) == "VERDICT_UNSPECIFIED"
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        assert message.name[0].isupper() and "_" not in message.name
        for field in message.fields:
            assert field.name == field.name.lower(), f"{message.name}.{field.name} is not snake_case"
