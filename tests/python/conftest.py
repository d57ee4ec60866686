"""Starts real braid servers on 127.0.0.1 for the OpenAI-client tests."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "release" / "braid"
MODEL_NAME = "smollm2"


class Server:
    def __init__(self, *extra_args, env=None):
        # A test may size the KV cache itself (to make requests wait for blocks).
        kv = [] if "--kv-cache-bytes" in extra_args else ["--kv-cache-bytes", "400000000"]
        args = [str(BINARY), "serve", "--port", "0", "--served-model-name", MODEL_NAME, *kv, *extra_args]
        self.proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("braid serve exited:\n" + "".join(self.log))
            self.log.append(line)
            match = re.search(r"on http://([\d.]+):(\d+)/v1", line)
            if match:
                self.url = f"http://{match.group(1)}:{match.group(2)}"
                break
        else:
            raise RuntimeError("braid serve did not start")
        # Keep draining stderr so the server never blocks on a full pipe.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def health(self):
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_for(predicate, seconds):
    """Polls `predicate` until it holds (True) or `seconds` pass (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def metric(text, name, labels=""):
    """A sample's value from Prometheus text (0 when absent): `name{labels} value`."""
    key = name + ("{" + labels + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
