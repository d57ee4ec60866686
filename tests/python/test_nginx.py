"""deploy/nginx-braid.conf: two replicas behind nginx keep each session on one replica, and the
other takes a session over when its replica stops. Needs nginx (`.ci/run` installs it); skipped
without it unless BRAID_REQUIRE_NGINX is set, as in CI."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL_NAME, ROOT, Server

NGINX = shutil.which("nginx") or next((p for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx"] if os.access(p, os.X_OK)), None)

if NGINX is None:
    if os.environ.get("BRAID_REQUIRE_NGINX"):
        raise RuntimeError("nginx is required (BRAID_REQUIRE_NGINX is set) but not installed: apt-get install -y nginx")
    pytest.skip("nginx is not installed (apt-get install -y nginx); .ci/run installs it", allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in the foreground on a private prefix, with deploy/nginx-braid.conf pointed at the
    given replicas."""

    def __init__(self, tmp: Path, replicas):
        self.port = free_port()
        snippet = (ROOT / "deploy" / "nginx-braid.conf").read_text()
        for placeholder, replica in zip(["127.0.0.1:8001", "127.0.0.1:8002"], replicas):
            assert placeholder in snippet
            snippet = snippet.replace(placeholder, replica.url.removeprefix("http://"))
        assert "listen 127.0.0.1:8000;" in snippet
        snippet = snippet.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{self.port};")
        (tmp / "braid.conf").write_text(snippet)
        temp = {name: tmp / name for name in ["body", "proxy", "fastcgi", "uwsgi", "scgi"]}
        (tmp / "nginx.conf").write_text(
            "events {}\n"
            "http {\n"
            "    access_log off;\n"
            + "".join(f"    {name}_temp_path {path};\n" for name, path in zip(
                ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"], temp.values()))
            + f"    include {tmp / 'braid.conf'};\n"
            "}\n"
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", "stderr", "-g", f"daemon off; pid {tmp / 'nginx.pid'};"],
            stderr=subprocess.PIPE, text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited: " + self.proc.stderr.read())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def turn(url, session, messages):
    r = httpx.post(url + "/v1/chat/completions", headers={"X-Session-ID": session}, timeout=120,
                   json={"model": MODEL_NAME, "messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    return r.headers["x-braid-replica"], body["choices"][0]["message"]["content"], body["usage"]


def test_sessions_stick_to_one_replica_and_move_when_it_stops(tmp_path):
    replicas = [Server("--replica-id", name) for name in ["a", "b"]]
    nginx = None
    try:
        nginx = Nginx(tmp_path, replicas)
        system = {"role": "system", "content": "You are a terse assistant for a bicycle shop. " * 12}
        conversations = {f"session-{i}": [system] for i in range(8)}
        seen, last_prompt = {}, {}
        for t in range(3):
            for session, messages in conversations.items():
                messages.append({"role": "user", "content": f"Question {t} of {session}: what should I check first?"})
                replica, reply, usage = turn(nginx.url, session, messages)
                messages.append({"role": "assistant", "content": reply})
                seen.setdefault(session, set()).add(replica)
                if t > 0:
                    # The replica that holds the conversation has all of its earlier turns.
                    assert usage["prompt_tokens_details"]["cached_tokens"] >= last_prompt[session] - 16, (usage, last_prompt[session])
                last_prompt[session] = usage["prompt_tokens"]
        assert all(len(r) == 1 for r in seen.values()), f"a session moved between replicas: {seen}"
        assert {next(iter(r)) for r in seen.values()} == {"a", "b"}, f"eight sessions all hashed to one replica: {seen}"

        # Stop replica a: its sessions go on, on b.
        moved = [s for s, r in seen.items() if r == {"a"}]
        replicas[0].stop()
        for session in moved:
            messages = conversations[session] + [{"role": "user", "content": "And after that?"}]
            replica, reply, _ = turn(nginx.url, session, messages)
            assert replica == "b" and reply is not None
        stayed = next(s for s, r in seen.items() if r == {"b"})
        assert turn(nginx.url, stayed, conversations[stayed] + [{"role": "user", "content": "Thanks"}])[0] == "b"
    finally:
        if nginx:
            nginx.stop()
        for r in replicas:
            r.stop()
