"""The disk tier of the prefix cache and sessions, on real `braid serve` processes."""

import json
import signal
import time

import httpx
import pytest

from conftest import MODEL_NAME, Server

TOPICS = ["billing", "shipping", "returns", "warranty", "accounts", "security", "privacy", "gift cards", "subscriptions", "repairs"]


def rule(i):
    t = TOPICS[i % len(TOPICS)]
    return (f"Rule {i + 1}: when a customer asks about {t}, answer in at most {3 + i % 5} sentences, "
            f"cite policy section {i // 3 + 1}.{i % 7}, and never promise a date you cannot check.")


def system_prompt(url, tokens):
    """A support-desk system prompt of at least `tokens` tokens once rendered as a chat."""
    lines = ["You are the support assistant of Northwind Outfitters. Follow every rule below."]
    while True:
        lines.extend(rule(len(lines) + k) for k in range(5))
        text = "\n".join(lines)
        count = httpx.post(url + "/tokenize", json={"messages": [{"role": "system", "content": text}, {"role": "user", "content": "Hi"}]}, timeout=30).json()["count"]
        if count >= tokens:
            return text


def stream_chat(url, messages, headers=None, max_tokens=8):
    """Streams one chat completion; returns (seconds to the first token, text, usage)."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, pieces, usage = None, [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                pieces.append(c["delta"].get("content") or "")
    return ttft, "".join(pieces), usage


def metric(url, name):
    """The value of one series of /metrics (the first line starting with `name`)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_restarted_server_answers_a_2000_token_prefix_from_disk(tmp_path):
    cache = ["--prompt-cache-dir", str(tmp_path / "cache")]
    first = Server(*cache)
    try:
        system = system_prompt(first.url, 2000)
        cold_ttft, cold_text, cold_usage = stream_chat(first.url, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
        assert cold_usage["prompt_tokens"] >= 2000 and cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        first.stop()
    assert first.proc.returncode == 0

    second = Server(*cache)
    try:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
        warm_ttft, warm_text, usage = stream_chat(second.url, messages)
        prompt = usage["prompt_tokens"]
        prefilled = metric(second.url, "braid_prefilled_tokens_total")
        from_disk = metric(second.url, 'braid_prefix_hit_tokens_total{tier="disk"}')
        print(f"\n{prompt}-token prompt: TTFT cold {cold_ttft * 1000:.0f} ms, after a restart {warm_ttft * 1000:.0f} ms; "
              f"prefilled {prefilled:.0f} tokens, {from_disk:.0f} from disk")
        assert prefilled < 0.1 * prompt
        assert from_disk >= 0.9 * prompt
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.9 * prompt
        assert warm_text == cold_text, "tokens computed on K/V loaded from disk are the cold run's"
        assert warm_ttft < cold_ttft / 2
    finally:
        second.stop()


def test_kill_9_during_writes_leaves_nothing_that_loads_wrong(tmp_path):
    folder = tmp_path / "cache"
    reference = Server()
    try:
        system = system_prompt(reference.url, 600)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Where is my parcel?"}]
        _, expected, _ = stream_chat(reference.url, messages, max_tokens=16)
    finally:
        reference.stop()

    victim = Server("--prompt-cache-dir", str(folder))
    stream_chat(victim.url, messages, max_tokens=16)
    victim.proc.send_signal(signal.SIGKILL)  # while the writer may still be busy
    victim.proc.wait(timeout=10)
    sub = next(p for p in folder.iterdir() if p.is_dir())
    blocks = sorted(sub.glob("*.kv"))
    # What a crash can also leave: a half-written temporary file and a file cut short.
    (sub / ".0123456789abcdef.kv.tmp12345").write_bytes(b"\0" * 1000)
    if blocks:
        data = blocks[len(blocks) // 2].read_bytes()
        blocks[len(blocks) // 2].write_bytes(data[: len(data) // 3])

    survivor = Server("--prompt-cache-dir", str(folder))
    try:
        _, text, usage = stream_chat(survivor.url, messages, max_tokens=16)
        assert text == expected
        # (The survivor's own writes in progress may have temporary files of its pid.)
        leftovers = [p for p in sub.glob(".*tmp*") if not p.name.endswith(f".tmp{survivor.proc.pid}")]
        assert not leftovers, "unfinished writes are removed at start"
        log = "".join(survivor.log)
        assert "unfinished write" in log
        if blocks:
            assert "truncated" in log
    finally:
        survivor.stop()


def test_an_unusable_cache_folder_is_a_clear_error(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(RuntimeError) as e:
        Server("--prompt-cache-dir", str(not_a_folder / "cache"))
    message = str(e.value)
    assert "prompt-cache-dir" in message and "panicked" not in message


def test_sessions_are_accepted_and_bad_ids_refused(server, client):
    headers = {"X-Session-ID": "conversation-1"}
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=2, extra_headers=headers)
    assert r.choices[0].message.content is not None
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=2, user="alice")
    assert r.choices[0].message.content is not None
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "x" * 257}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-ID"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "user": "u" * 300}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'braid_prefix_hit_tokens_total{tier="memory"}' in text and 'braid_prefix_hit_tokens_total{tier="disk"}' in text
    assert r.headers["x-braid-replica"] == server.url.removeprefix("http://")


def test_cache_save_ls_rm_clear(tmp_path):
    import subprocess

    from conftest import BINARY, ROOT

    folder = tmp_path / "cache"
    system = "\n".join(rule(i) for i in range(30))
    (tmp_path / "system.txt").write_text(system)

    def cache(*args):
        run = subprocess.run([str(BINARY), "cache", *args, "--prompt-cache-dir", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stdout

    saved = cache("save", "--prompt-file", str(tmp_path / "system.txt"), "--chat")
    blocks = int(saved.split("tokens: ")[1].split()[0])
    assert blocks > 40, saved
    listed = [json.loads(line) for line in cache("ls", "--json").splitlines()]
    assert len(listed) == 1 and listed[0]["blocks"] == blocks and listed[0]["block_size"] == 16
    assert "SmolLM2" in listed[0]["model"]

    # A server on the folder finds the saved system prompt: the first request is warm.
    s = Server("--prompt-cache-dir", str(folder))
    try:
        _, _, usage = stream_chat(s.url, [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}])
        assert usage["prompt_tokens_details"]["cached_tokens"] == blocks * 16
    finally:
        s.stop()

    removed = cache("rm", "--prompt-file", str(tmp_path / "system.txt"), "--chat")
    assert f"removed {blocks} of the prompt's {blocks} blocks" in removed
    cache("save", "--prompt", "A short one, of more than sixteen tokens, so that one block at least is full.")
    assert "1 models" in cache("ls")
    assert cache("clear").startswith("removed ")
    assert "0 models" in cache("ls")
    with pytest.raises(AssertionError):
        cache("rm", "not-hex")


def test_a_second_server_on_the_folder_is_refused_and_leaves_the_firsts_files(tmp_path):
    import subprocess

    from conftest import BINARY, ROOT

    folder = tmp_path / "cache"
    first = Server("--prompt-cache-dir", str(folder))
    try:
        sub = next(p for p in folder.iterdir() if p.is_dir())
        # A write of the first server in progress (between create and rename).
        in_flight = sub / f".0123456789abcdef.kv.tmp{first.proc.pid}"
        in_flight.write_bytes(b"\0" * 1000)
        with pytest.raises(RuntimeError) as e:
            Server("--prompt-cache-dir", str(folder))
        message = str(e.value)
        assert str(folder) in message and f"pid {first.proc.pid}" in message, message
        assert "panicked" not in message
        assert in_flight.exists(), "the refused server removed nothing"
        # `braid cache clear` would remove the server's files: refused too; `ls` only reads.
        run = lambda *args: subprocess.run([str(BINARY), "cache", *args, "--prompt-cache-dir", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        cleared = run("clear")
        assert cleared.returncode != 0 and f"pid {first.proc.pid}" in cleared.stderr, cleared.stderr
        assert in_flight.exists()
        assert run("ls").returncode == 0
        # The first server goes on serving.
        _, text, _ = stream_chat(first.url, [{"role": "user", "content": "Hello"}], max_tokens=4)
        assert text
    finally:
        first.stop()
    assert first.proc.returncode == 0
    # Once it has stopped, the folder is free again.
    second = Server("--prompt-cache-dir", str(folder))
    second.stop()
    assert not in_flight.exists(), "a start removes what an earlier process left unfinished"
