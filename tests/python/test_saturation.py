"""A saturated server still answers its probes: with 64 long requests running and 200 more
queued, /health and /metrics answer in under 100 ms at the 99th percentile (a load balancer
or Prometheus that times out marks a busy replica dead), also while clients keep sending
large prompts that the server must tokenize (and refuse)."""

import statistics
import threading
import time

import httpx
import pytest

from conftest import MODEL_NAME, Server, wait_for

RUNNING = 64
QUEUED = 200
PROBES = 100


def probe(client, path):
    times = []
    for _ in range(PROBES):
        start = time.perf_counter()
        r = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, r.text
        time.sleep(0.01)
    times.sort()
    return times


@pytest.mark.parametrize("flood", [False, True], ids=["quiet", "flooded"])
def test_probes_answer_fast_while_saturated(flood):
    s = Server("--max-num-seqs", str(RUNNING), "--queue-size", str(QUEUED), "--queue-timeout", "600", "--shutdown-grace", "1")
    try:
        statuses = []

        def long_request(i):
            # Long generations with distinct prompts: none ends while the probes run.
            body = {"model": MODEL_NAME, "prompt": f"Request {i}: write a long story about the number {i}.", "max_tokens": 4000, "ignore_eos": True}
            try:
                r = httpx.post(s.url + "/v1/completions", json=body, timeout=600)
                statuses.append(r.status_code)
            except httpx.HTTPError:
                pass  # the server stops at the end of the test

        threads = [threading.Thread(target=long_request, args=(i,), daemon=True) for i in range(RUNNING + QUEUED)]
        for t in threads:
            t.start()
        saturated = lambda: (lambda h: (h["running"], h["waiting"]) == (RUNNING, QUEUED))(s.health())  # noqa: E731
        assert wait_for(saturated, 120), f"not saturated: {s.health()}"
        flooding = threading.Event()
        refused = []

        def flood_requests():
            # Too long for the context: tokenized, then refused with a 400, again and again.
            text = " ".join(f"word{i}" for i in range(10000))
            with httpx.Client(timeout=60) as c:
                while flooding.is_set():
                    refused.append(c.post(s.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": text, "max_tokens": 1}).status_code)

        flooders = [threading.Thread(target=flood_requests, daemon=True) for _ in range(2 if flood else 0)]
        flooding.set()
        for t in flooders:
            t.start()
        with httpx.Client(base_url=s.url, timeout=10) as client:
            health = probe(client, "/health")
            metrics = probe(client, "/metrics")
        flooding.clear()
        for t in flooders:
            t.join(timeout=60)
        assert set(refused) <= {400}, refused
        assert not flood or refused, "the flood sent nothing"
        h = s.health()
        assert (h["running"], h["waiting"]) == (RUNNING, QUEUED), f"the load eased during the probes: {h}"
        assert not statuses, f"a long request ended early: {statuses}"
        p99 = {name: t[int(0.99 * len(t)) - 1] for name, t in [("/health", health), ("/metrics", metrics)]}
        print(
            f"\nsaturated ({RUNNING} running, {QUEUED} queued{f', {len(refused)} large prompts refused meanwhile' if flood else ''}): "
            + "; ".join(f"{name} median {statistics.median(t):.1f} ms, p99 {p99[name]:.1f} ms, max {t[-1]:.1f} ms" for name, t in [("/health", health), ("/metrics", metrics)])
        )
        for name, ms in p99.items():
            assert ms < 100, f"{name} p99 {ms:.1f} ms while saturated"
    finally:
        s.stop()
