"""`dynaexq serve --replicas N`: argument checks, and the command end to end (it starts its
own small Ray instance, serves two CPU replicas on a loopback port, and stops on SIGTERM).

Runs after tests/test_serve_ray.py has shut its Ray instance down (modules run one after
the other), so only one Ray instance is up at a time.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from dynaexq.cli import main  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_replicas_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err


def test_replicas_need_a_fixed_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--replicas", "2", "--port", "0"]) == 2
    assert "fixed --port" in capsys.readouterr().err


def test_ray_options_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--replicas", "--router", "--ray-address", "--replica-gpus"):
        assert opt in out


def test_serve_replicas_end_to_end(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "dynaexq.cli", "serve", "--replicas", "2", "--ray-cpus", "2",
        "--replica-cpus", "1", "--max-batch", "2", "--max-context", "128",
        "--port", str(port), "--dtype", "float32",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 150
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                payload = {"model": "dynaexq-embedded", "prompt": "def f(", "max_tokens": 4}
                conn.request(
                    "POST", "/v1/completions", json.dumps(payload),
                    {"Content-Type": "application/json"},
                )  # fmt: skip
                resp = conn.getresponse()
                raw = resp.read()
                conn.close()
                if resp.status == 200:
                    body = json.loads(raw)
                    break
            except OSError:
                pass
            time.sleep(1)
        assert body is not None, log.read_text()[-4000:]
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-4000:]
