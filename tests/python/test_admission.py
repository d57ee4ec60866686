"""Admission control, cancellation, auth and shutdown, each on its own small server."""

import signal
import threading
import time

import httpx
import pytest

from conftest import MODEL_NAME, Server, metric, wait_for

LONG = {"model": MODEL_NAME, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def tiny():
    s = Server("--max-num-seqs", "1", "--queue-size", "1", "--queue-timeout", "2")
    yield s
    s.stop()


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


def test_the_deadline_covers_the_wait_in_the_engine_queue():
    """--queue-timeout runs from arrival until the engine starts the request: one that got a
    slot but waits in the engine's queue for KV blocks is answered 503 at its deadline (a stream
    before any chunk), not whenever the blocks come free."""
    # 100 blocks of 16 tokens. A running request (100 prompt tokens, 1,450 to generate) holds
    # 7 of them, so a 1,500-token prompt (94 blocks) cannot start before it ends, seconds later.
    block = 368640
    s = Server("--kv-cache-bytes", str(100 * block), "--queue-timeout", "3")
    try:
        text = httpx.post(s.url + "/tokenize", json={"prompt": "The history of the world is long. " * 20}, timeout=10).json()["tokens"][:100]
        big = httpx.post(s.url + "/tokenize", json={"prompt": "Numbers, letters and colors: " * 400}, timeout=10).json()["tokens"][:1500]
        assert len(text) == 100 and len(big) == 1500
        results = {}
        done = threading.Event()

        def holder():
            body = {"model": MODEL_NAME, "prompt": text, "max_tokens": 1450, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=300) as r:
                results["holder"] = r.status_code
                for _ in r.iter_lines():
                    if done.is_set():
                        break

        def waiter(stream):
            start = time.time()
            body = {"model": MODEL_NAME, "prompt": big, "max_tokens": 4, "stream": stream}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=300) as r:
                r.read()
                results[stream] = (r.status_code, r.text, time.time() - start)

        h = threading.Thread(target=holder)
        h.start()
        assert wait_for(lambda: s.health()["running"] == 1, 10)
        waiters = [threading.Thread(target=waiter, args=(stream,)) for stream in (False, True)]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join(timeout=120)
        for stream in (False, True):
            status, text, waited = results[stream]
            assert status == 503, f"stream={stream}: {status} after {waited:.1f} s"
            assert "queue_timeout" in text and "data:" not in text
            assert waited < 8, f"answered after {waited:.1f} s"
        assert wait_for(lambda: s.health()["waiting"] == 0, 10), "the timed-out requests left the engine's queue"
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        assert metric(metrics, "braid_rejections_total", 'reason="queue_timeout"') == 2
        assert metric(metrics, "braid_aborted_requests_total") == 0, "a deadline is not a client abort"
        assert results["holder"] == 200 and s.health()["running"] == 1, "the running request was not disturbed"
        done.set()
        h.join(timeout=30)
    finally:
        s.stop()


def test_finishes_are_counted_by_their_real_reasons():
    """A stop string ends a choice with finish_reason "stop": not an abort; each of `n`
    choices counts once, by its own reason; a client that leaves is an abort."""
    s = Server()
    try:
        before = httpx.get(s.url + "/metrics", timeout=10).text
        body = {"model": MODEL_NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "n": 2, "stop": [","]}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["stop", "stop"]
        assert wait_for(lambda: s.health()["running"] == 0, 10)
        time.sleep(0.3)
        after = httpx.get(s.url + "/metrics", timeout=10).text
        stops = metric(after, "braid_requests_total", 'finish_reason="stop"') - metric(before, "braid_requests_total", 'finish_reason="stop"')
        aborts = metric(after, "braid_aborted_requests_total") - metric(before, "braid_aborted_requests_total")
        assert (stops, aborts) == (2, 0), f"stop-string finishes counted as {stops} stops and {aborts} aborts"

        # A client that goes away mid-stream is an abort, once per sequence it leaves behind.
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "stream": True, "max_tokens": 500}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
        assert wait_for(lambda: s.health()["running"] == 0, 10)
        time.sleep(0.3)
        last = httpx.get(s.url + "/metrics", timeout=10).text
        assert metric(last, "braid_aborted_requests_total") - metric(after, "braid_aborted_requests_total") == 1
        assert metric(last, "braid_requests_total", 'finish_reason="abort"') - metric(after, "braid_requests_total", 'finish_reason="abort"') == 1
    finally:
        s.stop()


def test_time_per_output_token_is_per_choice():
    """TPOT is measured per sequence: n=4 choices decoding side by side take a step per token
    each, not a quarter of one (the old histogram divided by all choices' tokens)."""
    s = Server()
    try:
        names = ["braid_time_per_output_token_seconds_count", "braid_time_per_output_token_seconds_sum", "braid_time_to_first_token_seconds_sum", "braid_e2e_request_latency_seconds_sum"]
        before = httpx.get(s.url + "/metrics", timeout=10).text
        body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True, "temperature": 0.8, "seed": 7, "n": 4}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 128
        after = httpx.get(s.url + "/metrics", timeout=10).text
        count, tpot_sum, ttft, e2e = (metric(after, n) - metric(before, n) for n in names)
        assert count == 4, f"{count} TPOT samples for 4 choices"
        # Every choice decodes its 31 later tokens over about (e2e - ttft).
        ratio = (tpot_sum / count) * 31 / (e2e - ttft)
        assert 0.5 < ratio < 1.5, f"TPOT x 31 is {ratio:.2f} of the decoding time"
    finally:
        s.stop()


def test_the_deadline_never_cuts_off_a_prefill_under_way():
    """A prompt whose prefill alone takes longer than --queue-timeout is answered: the deadline
    covers waiting, not the work of a request the engine has started."""
    s = Server("--queue-timeout", "1")
    try:
        tokens = httpx.post(s.url + "/tokenize", json={"prompt": "Numbers, letters and colors: " * 600}, timeout=10).json()["tokens"]
        for shift, stream in ((0, False), (1, True)):
            # Shifted by a token, so the second prompt shares no cached block with the first.
            ids = tokens[shift : shift + 3000]
            assert len(ids) == 3000
            start = time.time()
            body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": 2, "stream": stream}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=300) as r:
                text = r.read().decode()
                assert r.status_code == 200, text
            took = time.time() - start
            assert "queue_timeout" not in text
            # Only meaningful if the prefill really outlasted the deadline.
            assert took > 1.0, f"the 3,000-token prefill took only {took:.2f} s"
    finally:
        s.stop()
