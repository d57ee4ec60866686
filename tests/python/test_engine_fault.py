"""A failing engine, caused on purpose with the test-only BRAID_TEST_FAULT hook: a failed step
fails only its own requests and the server goes on; an engine that cannot go on makes /health
answer 503 with the reason, ends every request with an error (never a hang) and exits non-zero."""

import json
import threading
import time

import httpx
import pytest

from conftest import MODEL_NAME, Server

BODY = {"model": MODEL_NAME, "prompt": "Count:", "max_tokens": 12, "ignore_eos": True, "temperature": 0}


def call(server, stream, max_tokens=12, timeout=30):
    """One completion; returns (status, error message or None, text streamed before the end)."""
    body = {**BODY, "max_tokens": max_tokens, "stream": stream}
    if not stream:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)
        data = r.json()
        return r.status_code, data.get("error", {}).get("message"), "".join(c["text"] for c in data.get("choices", []))
    text, error, done = "", None, False
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()["error"]["message"], ""
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                error = chunk["error"]["message"]
            else:
                text += chunk["choices"][0]["text"]
    assert done != (error is not None), "a stream ends with [DONE] or with an error, not both or neither"
    return 200, error, text


class HealthWatch:
    """Polls /health every 50 ms in the background; keeps each (status, body) seen."""

    def __init__(self, server):
        self.seen = []
        self.stop = False
        self.thread = threading.Thread(target=self._poll, args=(server.url,), daemon=True)
        self.thread.start()

    def _poll(self, url):
        while not self.stop:
            try:
                r = httpx.get(url + "/health", timeout=2)
                self.seen.append((r.status_code, r.json()))
            except httpx.HTTPError:
                pass  # not answering (shutting down)
            time.sleep(0.05)

    def unhealthy(self):
        return [body for status, body in self.seen if status != 200]


@pytest.mark.parametrize("fault,stream", [("panic-once@3", False), ("error-once@3", True)])
def test_a_failed_step_fails_its_request_and_the_server_goes_on(fault, stream):
    s = Server(env={"BRAID_TEST_FAULT": fault})
    try:
        # Forward passes 1 and 2 are the prompt and the second token; pass 3 fails.
        status, error, text = call(s, stream)
        if stream:
            assert status == 200 and text, "two tokens went out before the failure"
        else:
            assert status == 500
        assert error and "the engine step failed" in error and "injected test fault" in error, error
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert r.json()["running"] == 0 and r.json()["waiting"] == 0
        # The next requests are served as usual, streaming and not.
        for again in (False, True):
            status, error, text = call(s, again)
            assert (status, error) == (200, None) and text
        assert s.proc.poll() is None
    finally:
        s.stop()


def test_an_engine_that_keeps_failing_is_declared_stopped():
    # One sequence at a time: each failing step holds one request; the third in a row stops it.
    s = Server("--max-num-seqs", "1", env={"BRAID_TEST_FAULT": "panic-always@3"})
    health = HealthWatch(s)
    try:
        results = [None] * 5
        start = time.time()

        def one(i):
            results[i] = (*call(s, stream=i % 2 == 0), time.time() - start)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=30)
        assert all(not t.is_alive() for t in threads), "a request hung"
        for status, error, _, took in results:
            assert status in (200, 500, 503) and error, (status, error)
            assert took < 15
        messages = [r[1] for r in results]
        assert sum("the engine step failed" in m for m in messages) == 3, messages
        assert all("the engine step failed" in m or "stopped" in m or "shutting down" in m for m in messages), messages
        code = s.proc.wait(timeout=30)
        assert code != 0
        health.stop = True
        bad = health.unhealthy()
        assert bad and bad[0]["status"] == "error", health.seen[-3:]
        assert "3 engine steps failed in a row" in bad[0]["reason"] and "injected test fault" in bad[0]["reason"]
        assert any("the engine has stopped" in line for line in s.log)
    finally:
        health.stop = True
        s.stop()


def test_a_dead_engine_thread_ends_every_request_and_the_process():
    # The engine thread itself panics (outside a step) once 30 forward passes have run: both
    # requests (200 tokens each) are in the engine by then.
    s = Server(env={"BRAID_TEST_FAULT": "panic-thread@30"})
    health = HealthWatch(s)
    try:
        assert httpx.get(s.url + "/health", timeout=5).json()["status"] == "ok"
        results = {}

        def one(stream):
            results[stream] = call(s, stream, max_tokens=200)

        threads = [threading.Thread(target=one, args=(stream,)) for stream in (True, False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert all(not t.is_alive() for t in threads), "a request hung"
        for stream, (status, error, _) in results.items():
            assert error and "the engine has stopped" in error and "the engine thread failed" in error, (stream, status, error)
            assert status == (200 if stream else 500)
        # Health agrees at once, then the process goes.
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 503
        assert r.json()["status"] == "error" and "injected test fault" in r.json()["reason"]
        late = httpx.post(s.url + "/v1/completions", json=BODY, timeout=10)
        assert late.status_code in (500, 503) and late.json()["error"]["message"]
        assert s.proc.wait(timeout=30) != 0
        health.stop = True
        assert all(body["status"] == "error" for body in health.unhealthy())
    finally:
        health.stop = True
        s.stop()
