"""Soak: ~2,000 mixed requests on one real server (chat and legacy completions, streaming and
not, n > 1, seeded sampling, stop strings), a fifth of them abandoned by their client at a
random moment. Afterwards nothing is running or waiting, the KV pool is back to its baseline,
no request got a 5xx, the metrics count every choice by its real reason, and the server's
memory growth is reported.

BRAID_SOAK_REQUESTS sets the number of requests (default 2,000; at 32 at once with a few
tokens each, a few minutes on two shared cores)."""

import asyncio
import json
import os
import random
import time

import httpx

from conftest import MODEL_NAME, Server, metric

TOTAL = int(os.environ.get("BRAID_SOAK_REQUESTS", "2000"))
CONCURRENCY = 32
DISCONNECT_SHARE = 0.2

SYSTEM = "You are a terse assistant. Answer in one short sentence."
QUESTIONS = ["Name a color.", "What is 2 + 2?", "Say hello.", "Name a fruit.", "Where is Paris?", "Count to three.", "Name an animal.", "What day follows Monday?"]
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "The quick brown fox", "def add(a, b):", "Water boils at"]
STOPS = [["."], ["\n"], [" the", ","], ["!"]]


def reasons(text):
    return {r: metric(text, "braid_requests_total", f'finish_reason="{r}"') for r in ("stop", "length", "abort", "error")}


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def make_request(rng):
    chat = rng.random() < 0.5
    n = rng.choice([1, 1, 1, 2, 3])
    body = {"model": MODEL_NAME, "max_tokens": rng.randint(1, 10), "n": n}
    if chat:
        messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        body["messages"] = messages
    else:
        body["prompt"] = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        body["temperature"] = 0.8
        body["seed"] = rng.randint(0, 1000)
    else:
        body["temperature"] = 0
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    stream = rng.random() < 0.5
    body["stream"] = stream
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    leave = None
    if rng.random() < DISCONNECT_SHARE:
        # When the client goes away: after k lines of a stream, or after t seconds.
        leave = rng.randint(0, 6) if stream else rng.uniform(0.0, 1.0)
    return path, body, leave


async def one(client, url, path, body, leave, seen):
    n = body["n"]
    if body["stream"]:
        lines = 0
        async with client.stream("POST", url + path, json=body) as r:
            seen["status"].append(r.status_code)
            if r.status_code != 200:
                await r.aread()
                seen["bodies"].append(r.text)
                return
            finished = 0
            async for line in r.aiter_lines():
                if leave is not None and lines >= leave:
                    seen["left"] += n
                    return  # closes the connection mid-stream
                if line.startswith("data:"):
                    lines += 1
                    if line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    assert "error" not in chunk, chunk
                    finished += sum(1 for c in chunk["choices"] if c.get("finish_reason"))
            if leave is not None:
                seen["left"] += n  # asked to leave, but the stream ended first
                return
            assert finished == n, (body, finished)
            seen["completed"] += n
        return
    try:
        r = await asyncio.wait_for(client.post(url + path, json=body), timeout=leave) if leave is not None else await client.post(url + path, json=body)
    except asyncio.TimeoutError:
        seen["left"] += n
        return
    seen["status"].append(r.status_code)
    if r.status_code != 200:
        seen["bodies"].append(r.text)
        return
    if leave is not None:
        seen["left"] += n
        return
    choices = r.json()["choices"]
    assert len(choices) == n and all(c["finish_reason"] in ("stop", "length") for c in choices), r.text
    seen["completed"] += n


async def soak(url, requests):
    seen = {"status": [], "bodies": [], "left": 0, "completed": 0}
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        queue = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)

        async def worker():
            while not queue.empty():
                path, body, leave = queue.get_nowait()
                await one(client, url, path, body, leave, seen)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return seen


def test_soak_leaves_nothing_behind():
    # A KV pool of 64 MB (173 blocks): small enough that bursts of n > 1 preempt and
    # recompute, and that the pages it touches do not read as memory growth.
    s = Server("--queue-timeout", "300", "--kv-cache-bytes", "64000000")
    try:
        # Warm up (the first request's allocations are not a leak), then take the baseline.
        httpx.post(s.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}, timeout=60)
        base_metrics = httpx.get(s.url + "/metrics", timeout=10).text
        base_blocks = metric(base_metrics, "braid_kv_blocks_used")
        base_aborts = metric(base_metrics, "braid_aborted_requests_total")
        base_reasons = reasons(base_metrics)
        rss_before = rss_mib(s.proc.pid)

        rng = random.Random(20)
        requests = [make_request(rng) for _ in range(TOTAL)]
        sent_choices = sum(body["n"] for _, body, _ in requests)
        start = time.time()
        # In two halves: growth in the second is what a leak would look like (the first also
        # pays for allocator arenas and the KV pages touched for the first time).
        half = TOTAL // 2
        seen = asyncio.run(soak(s.url, requests[:half]))
        rss_mid = rss_mib(s.proc.pid)
        rest = asyncio.run(soak(s.url, requests[half:]))
        seen = {k: seen[k] + rest[k] for k in seen}
        elapsed = time.time() - start

        deadline = time.time() + 30
        while time.time() < deadline:
            h = s.health()
            if h["running"] == 0 and h["waiting"] == 0:
                break
            time.sleep(0.1)
        assert (h["running"], h["waiting"]) == (0, 0), f"left behind: {h}"
        time.sleep(0.5)
        end_metrics = httpx.get(s.url + "/metrics", timeout=10).text
        rss_after = rss_mib(s.proc.pid)
        blocks = metric(end_metrics, "braid_kv_blocks_used")
        aborts = metric(end_metrics, "braid_aborted_requests_total") - base_aborts
        counted = {r: v - base_reasons[r] for r, v in reasons(end_metrics).items()}
        statuses = {code: seen["status"].count(code) for code in set(seen["status"])}
        preemptions = metric(end_metrics, "braid_preemptions_total")
        print(
            f"\nsoak: {TOTAL} requests ({sent_choices} choices) in {elapsed:.0f} s; statuses {statuses}; "
            f"{seen['completed']} choices completed, {seen['left']} abandoned; metrics {counted}, aborted sequences {aborts:.0f}; {preemptions:.0f} preemptions; "
            f"KV blocks used {blocks:.0f} (baseline {base_blocks:.0f}); RSS {rss_before:.1f} -> {rss_mid:.1f} -> {rss_after:.1f} MiB "
            f"({rss_mid - rss_before:+.1f} in the first half, {rss_after - rss_mid:+.1f} in the second)"
        )
        assert not [c for c in seen["status"] if c >= 500], f"5xx answers: {seen['bodies'][:3]}"
        assert set(seen["status"]) == {200}, f"unexpected answers: {seen['bodies'][:3]}"
        assert blocks == base_blocks, f"KV blocks used {blocks} against a baseline of {base_blocks}"
        # Honest metrics: every choice answered in full is counted by its own finish reason;
        # aborts are sequences whose client left, never stop-string finishes.
        assert counted["stop"] + counted["length"] >= seen["completed"], counted
        assert counted["error"] == 0, counted
        assert aborts <= seen["left"], f"{aborts} aborted sequences, but clients left only {seen['left']} choices"
        assert sum(counted.values()) <= sent_choices
        assert rss_after - rss_before < 256, "memory grew by more than 256 MiB"
    finally:
        s.stop()
