"""Admission control, cancellation, auth and shutdown, each on its own small server."""

import signal
import threading
import time

import httpx
import pytest

from conftest import MODEL_NAME, Server

LONG = {"model": MODEL_NAME, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def tiny():
    s = Server("--max-num-seqs", "1", "--queue-size", "1", "--queue-timeout", "2")
    yield s
    s.stop()


def wait_for(predicate, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_429_and_queue_timeout_503(tiny):
    results = {}

    def long_request():
        with httpx.stream("POST", tiny.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            results["long"] = r.status_code
            for _ in r.iter_lines():
                if "waited" in results:
                    break

    runner = threading.Thread(target=long_request)
    runner.start()
    assert wait_for(lambda: tiny.health()["running"] == 1, 10)

    def queued():
        start = time.time()
        r = httpx.post(tiny.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=30)
        results["queued"] = (r.status_code, r.json(), time.time() - start)

    waiter = threading.Thread(target=queued)
    waiter.start()
    assert wait_for(lambda: tiny.health()["waiting"] == 1, 5)
    full = httpx.post(tiny.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert full.status_code == 429
    assert full.headers["retry-after"]
    assert full.json()["error"]["type"] == "rate_limit_error"
    waiter.join(timeout=30)
    status, body, waited = results["queued"]
    assert status == 503 and "queue" in body["error"]["message"]
    assert 1.5 < waited < 10
    assert tiny.health()["waiting"] == 0, "the timed-out request was freed"
    results["waited"] = True
    runner.join(timeout=30)
    assert results["long"] == 200
    metrics = httpx.get(tiny.url + "/metrics").text
    assert 'braid_rejections_total{reason="queue_full"}' in metrics
    assert 'braid_rejections_total{reason="queue_timeout"}' in metrics


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnected_client_is_dropped_within_a_second(tiny, stream):
    body = {**LONG, "stream": stream}

    def doomed():
        try:
            httpx.post(tiny.url + "/v1/completions", json=body, timeout=1.0)
        except httpx.TimeoutException:
            pass  # the client gives up and closes its connection

    t = threading.Thread(target=doomed)
    t.start()
    assert wait_for(lambda: tiny.health()["running"] == 1, 5)
    t.join()
    gone_at = time.time()
    assert wait_for(lambda: tiny.health()["running"] == 0, 1.0), "request still running after the client left"
    assert time.time() - gone_at <= 1.0
    # And the slot is free for the next client.
    r = httpx.post(tiny.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_api_key_is_required_on_v1():
    s = Server("--api-key", "sekrit")
    try:
        r = httpx.get(s.url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekrit"}, timeout=10)
        assert r.status_code == 200
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        assert not any("sekrit" in line for line in s.log)
    finally:
        s.stop()


def test_prompts_are_not_logged_by_default():
    s = Server(env={"BRAID_LOG": "debug"})
    try:
        httpx.post(s.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "a very private prompt", "max_tokens": 2}, timeout=30)
        s.stop()
        assert not any("very private" in line for line in s.log)
    finally:
        s.stop()


def test_sigterm_lets_running_requests_finish_and_exits_0():
    s = Server()
    result = {}

    def running():
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "max_tokens": 60}, timeout=60)
        result["r"] = r

    t = threading.Thread(target=running)
    t.start()
    assert wait_for(lambda: s.health()["running"] == 1, 10)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert result["r"].status_code == 200
    assert len(result["r"].json()["choices"][0]["text"]) > 0
    assert s.proc.wait(timeout=30) == 0


def metric(text, name, labels=""):
    """A sample's value from Prometheus text (0 when absent): `name{labels} value`."""
    key = name + ("{" + labels + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def test_tokenize_and_detokenize_need_the_api_key():
    s = Server("--api-key", "sekrit")
    try:
        for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})]:
            r = httpx.post(s.url + path, json=body, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            r = httpx.post(s.url + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=10)
            assert r.status_code == 401, path
            r = httpx.post(s.url + path, json=body, headers={"Authorization": "Bearer sekrit"}, timeout=10)
            assert r.status_code == 200, path
        # Probes stay open: a load balancer has no key.
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        assert httpx.get(s.url + "/metrics", timeout=10).status_code == 200
    finally:
        s.stop()
