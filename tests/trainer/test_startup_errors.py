"""Mistakes a user can make fail at start with one clear message naming the option (a one-rank run, in-process)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from oreal.train import main
from torchrun_launch import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.py")


@pytest.fixture
def one_rank(monkeypatch):
    """The environment torchrun gives a single process, restored afterwards."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)


def _run(capsys, *args) -> str:
    code = main(["--config", TINY, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("oreal-train: error:") == 1, err
    return err


def test_missing_model_path(one_rank, capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    err = _run(capsys, "--output-dir", str(tmp_path / "out"), "--model.tiny.enabled", "false",
               "--model.path", str(missing))
    assert "--model.path" in err and str(missing) in err and "is not a directory" in err


def test_model_path_without_config(one_rank, capsys, tmp_path):
    err = _run(capsys, "--output-dir", str(tmp_path / "out"), "--model.tiny.enabled", "false",
               "--model.path", str(tmp_path))
    assert "--model.path" in err and "no config.json" in err


def test_empty_prompt_file(one_rank, capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _run(capsys, "--output-dir", str(tmp_path / "out"), "--data.train_files", str(empty))
    assert "--data.train_files" in err and str(empty) in err


def test_missing_prompt_file(one_rank, capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    err = _run(capsys, "--output-dir", str(tmp_path / "out"), "--data.train_files", str(missing))
    assert "--data.train_files" in err and "does not exist" in err


class _Broken(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with a 500: reachable, but no verifier."""

    def do_POST(self):  # noqa: N802 - the http.server API
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["closed_port", "http_500"])
def test_unreachable_verifier(one_rank, capsys, tmp_path, server):
    if server == "closed_port":
        host, httpd = f"127.0.0.1:{free_port()}", None
    else:
        httpd = http.server.HTTPServer(("127.0.0.1", 0), _Broken)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        host = f"127.0.0.1:{httpd.server_address[1]}"
    try:
        err = _run(capsys, "--output-dir", str(tmp_path / "out"), "--judge.verifier_hosts", host,
                   "--judge.verifier_model", "judge", "--judge.verifier_timeout_s", "5")
    finally:
        if httpd is not None:
            httpd.shutdown()
    assert "--judge.verifier_hosts" in err and host in err and "unreachable" in err


def test_verifier_needs_a_model_name(one_rank, capsys, tmp_path):
    err = _run(capsys, "--output-dir", str(tmp_path / "out"), "--judge.verifier_hosts", "127.0.0.1:1")
    assert "--judge.verifier_model" in err


def test_config_errors_exit_2_without_a_process_group(capsys):
    assert main(["--config", TINY, "--train.stepz", "3"]) == 2
    assert "did you mean --train.steps" in capsys.readouterr().err
