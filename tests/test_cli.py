"""The `medhallguard` CLI: help text, output formats, exit codes, and lazy heavy imports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.cli import main
from tests.fakes import FakeGuard, png_bytes, serve_in_thread

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake_server():
    with serve_in_thread(FakeGuard()) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "chest.png"
    path.write_bytes(png_bytes())
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [[], ["serve"], ["ask"], ["score"], ["info"]])
def test_help_of_every_subcommand_works(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: medhallguard" in out
    assert "example" in out


def test_external_subcommands_are_listed_lazily_and_missing_ones_skipped(monkeypatch, capsys):
    import server.cli as cli

    monkeypatch.setitem(cli._EXTERNAL, "frobnicate", ("no_such_package.frob:add_parser", "does not exist"))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "init-model" in out  # training/init_model.py is in this checkout
    assert "frobnicate" not in out
    with pytest.raises(SystemExit) as e:
        main(["init-model", "--help"])  # now its module is imported and registers its own options
    assert e.value.code == 0
    assert "--family" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_ask_json_prints_one_parseable_object_with_the_verdict(fake_server, image, capsys):
    argv = ["ask", "--server", fake_server, "--image", str(image), "--json", "--request-id", "cli-1", "Any effusion?"]
    rc = main(argv)
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "VERDICT_ANSWER"
    assert out["request_id"] == "cli-1"
    assert 0.0 <= out["p_hallucination"] <= 1.0
    assert set(out["scores"]) == {"clinical_accuracy", "clinical_relevance", "detail_level", "risk_level"}
    assert "total_ms" in out["timings"]


@pytest.mark.timeout(30)
def test_ask_prints_a_readable_layout(fake_server, image, capsys):
    assert main(["ask", "--server", fake_server, "--image", str(image), "--max-new-tokens", "3", "Any effusion?"]) == 0
    out = capsys.readouterr().out
    for label in ("answer", "verdict", "p_hallucination", "premise_risk", "scores", "reasons", "timings (ms)"):
        assert f"\n{label}" in f"\n{out}", label
    assert "No acute cardiopulmonary" in out and "ANSWER" in out


@pytest.mark.timeout(30)
def test_ask_stream_prints_text_then_the_verdict(fake_server, image, capsys):
    assert main(["ask", "--server", fake_server, "--image", str(image), "--stream", "Any effusion?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No acute cardiopulmonary abnormality is seen.\n")
    assert "verdict" in out


@pytest.mark.timeout(30)
def test_score_and_info_against_a_server(fake_server, image, capsys):
    rc = main(["score", "--server", fake_server, "--image", str(image), "--question", "Any effusion?",
               "--answer", "Small left effusion.", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "Small left effusion."
    assert main(["info", "--server", fake_server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == "fake-model"
    assert main(["info", "--server", fake_server]) == 0
    assert "fake-model" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_invalid_argument_exits_2_with_the_status_on_stderr(fake_server, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    assert main(["ask", "--server", fake_server, "--image", str(bad), "Any effusion?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: ")


@pytest.mark.timeout(30)
def test_unknown_suffix_needs_a_media_type(fake_server, tmp_path, capsys):
    path = tmp_path / "scan.bmp"
    path.write_bytes(png_bytes())
    assert main(["ask", "--server", fake_server, "--image", str(path), "q?"]) == 2
    assert "--media-type" in capsys.readouterr().err
    assert main(["ask", "--server", fake_server, "--image", str(path), "--media-type", "image/png", "q?"]) == 0


@pytest.mark.timeout(30)
def test_unreachable_server_exits_3(image, capsys):
    rc = main(["ask", "--server", f"127.0.0.1:{_free_port()}", "--image", str(image), "--timeout", "2", "q?"])
    assert rc == 3
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


@pytest.mark.timeout(30)
def test_wait_ready_times_out_with_unavailable(image, capsys):
    rc = main(["info", "--server", f"127.0.0.1:{_free_port()}", "--wait-ready", "0.5"])
    assert rc == 3
    assert "not SERVING" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_wait_ready_returns_once_serving(fake_server, capsys):
    assert main(["info", "--server", fake_server, "--wait-ready", "5", "--json"]) == 0


@pytest.mark.timeout(60)
def test_help_and_remote_ask_do_not_import_torch(fake_server, image):
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from server.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
            for command in ("serve", "ask", "score", "info"):
                try:
                    main([command, "--help"])
                except SystemExit:
                    pass
            rc = main(["ask", "--server", "{fake_server}", "--image", r"{image}", "--json", "q?"])
        assert rc == 0, rc
        heavy = sorted(m for m in ("torch", "transformers", "guard.runtime") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.timeout(120)
def test_serve_prints_the_real_port_and_exits_0_on_sigterm(tmp_path, image):
    pytest.importorskip("torch", reason="serving a real model needs the [torch] extra")
    from training.init_model import init_model

    model = init_model(family="smolvlm", size="nano", out_dir=tmp_path / "model", seed=0)
    env = {**os.environ, "MEDHALLGUARD_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--address", "127.0.0.1:0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("serving on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        address = line.removeprefix("serving on ")
        assert int(address.rpartition(":")[2]) > 0
        ask = [sys.executable, "-m", "server.cli", "ask", "--server", address, "--wait-ready", "60",
               "--image", str(image), "--json", "--max-new-tokens", "2", "Any nodule?"]
        reply = subprocess.run(ask, cwd=REPO, capture_output=True, text=True, timeout=90)
        assert reply.returncode == 0, reply.stderr
        assert json.loads(reply.stdout)["verdict"].startswith("VERDICT_")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_config_parses_into_server_and_guard_configs():
    from guard.runtime import GuardConfig
    from server.config import split_config

    server_config, guard_tables = split_config(REPO / "examples" / "demo.toml")
    assert server_config.max_concurrency == 2
    assert GuardConfig.from_dict(guard_tables).decode.max_new_tokens == 64


def test_flags_override_environment_which_overrides_the_file(tmp_path, monkeypatch):
    from server.main import resolve_config

    path = tmp_path / "c.toml"
    path.write_text('[server]\naddress = "0.0.0.0:7000"\nmax_queue = 3\n[decode]\nmax_new_tokens = 9\n')
    monkeypatch.setenv("MEDHALLGUARD_ADDRESS", "127.0.0.1:7001")
    config, tables = resolve_config(str(path), {"max_queue": None, "max_concurrency": 5})
    assert (config.address, config.max_queue, config.max_concurrency) == ("127.0.0.1:7001", 3, 5)
    assert tables == {"decode": {"max_new_tokens": 9}}
    config, _ = resolve_config(str(path), {"address": "[::]:8000"}, port=0)
    assert config.address == "[::]:0"


def test_server_config_errors_name_the_field(tmp_path):
    from server.config import ServerConfig, split_config

    with pytest.raises(ValueError, match="max_concurrency"):
        ServerConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="address"):
        ServerConfig(address="localhost")
    path = tmp_path / "c.toml"
    path.write_text("[server]\nmax_cuncurrency = 3\n")
    with pytest.raises(ValueError, match="max_cuncurrency"):
        split_config(path)
