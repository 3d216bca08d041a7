"""A real `helexa-native serve` process for tests, always stopped, and small HTTP helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import requests

LISTEN_RE = re.compile(r"listening on http://([^:\s]+):(\d+)")


class ServerProcess:
    """`python -m helexa_native serve ... --port 0`, ready once /health answers 200."""

    def __init__(
        self,
        args: List[str],
        log_path: Path,
        start_timeout: float = 60.0,
        ready_timeout: float = 240.0,
        env: Optional[dict] = None,
    ) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.ready_timeout = ready_timeout
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self, wait_ready: bool = True) -> "ServerProcess":
        cmd = [
            sys.executable,
            "-m",
            "helexa_native",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-progress",
        ] + self.args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            self._wait_listening()
            if wait_ready:
                self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(self.log())
            if m:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"server did not start listening within {self.start_timeout}s:\n{self.log()[-3000:]}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                r = requests.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready within {self.ready_timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL if it lingers; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def sse_events(resp: requests.Response) -> List[bytes]:
    """The data payloads of a server-sent event stream, as raw bytes, [DONE] included."""
    buf = b""
    for piece in resp.iter_content(chunk_size=None):
        buf += piece
    out = []
    for event in buf.split(b"\n\n"):
        if not event.strip():
            continue
        assert event.startswith(b"data: "), event
        out.append(event[len(b"data: ") :])
    return out


def sse_json(resp: requests.Response) -> List[dict]:
    """Parsed JSON events of a stream; asserts it ends with exactly one [DONE]."""
    events = sse_events(resp)
    assert events and events[-1] == b"[DONE]", events[-3:]
    assert events.count(b"[DONE]") == 1
    return [json.loads(e.decode("utf-8")) for e in events[:-1]]


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(4))
    return total


def assert_envelope(resp: requests.Response, status: int, param=..., code=...) -> dict:
    """The response has `status` and an OpenAI error envelope; returns the error object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err
