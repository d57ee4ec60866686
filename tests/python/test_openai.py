"""braid's OpenAI-compatible API, driven by the official `openai` client and raw HTTP."""

import concurrent.futures
import json

import httpx
import openai
import pytest

from conftest import MODEL_NAME

CHAT = [{"role": "user", "content": "Name three colors."}]


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=kw.pop("messages", CHAT), **kw)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_chat_completion_and_usage(client, server):
    r = chat(client, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and r.created > 0 and r.system_fingerprint
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert r.usage.prompt_tokens == prompt["count"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 24
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 24


def test_legacy_completion_with_text_and_token_prompts(client, server):
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    r2 = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert back == "The capital of France is"
    two = client.completions.create(model=MODEL_NAME, prompt=["One", "Two"], max_tokens=4, temperature=0)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_streaming_equals_non_streaming_at_temperature_0(client):
    whole = chat(client, max_tokens=32, temperature=0)
    stream = chat(client, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens

    legacy = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    streamed = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == legacy.choices[0].text


def test_stop_strings_cut_and_are_never_emitted(client):
    base = client.completions.create(model=MODEL_NAME, prompt="List the days of the week:", max_tokens=40, temperature=0).choices[0].text
    # A stop string from the middle of the text (it spans tokens in general).
    cut = len(base) // 2
    stop = base[cut : cut + 3]
    assert stop.strip(), f"pick a visible stop string from {base!r}"
    expected = base[: base.index(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt="List the days of the week:", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL_NAME, prompt="List the days of the week:", max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seeds_are_reproducible_and_n_gives_distinct_choices(client):
    a = chat(client, max_tokens=24, temperature=1.0, seed=42)
    b = chat(client, max_tokens=24, temperature=1.0, seed=42)
    assert a.choices[0].message.content == b.choices[0].message.content
    texts = {chat(client, max_tokens=24, temperature=1.0, seed=s).choices[0].message.content for s in range(4)}
    assert len(texts) > 1, "different seeds should sample differently"
    two = chat(client, max_tokens=24, temperature=1.0, seed=7, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    again = chat(client, max_tokens=24, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    assert two.usage.completion_tokens <= 48


def test_logprobs_with_top_3(client):
    r = chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert item.token == item.top_logprobs[0].token
    legacy = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 3 for t in lp.top_logprobs)


def test_repeated_long_system_prompt_is_cached(client):
    system = "You are a meticulous assistant. " * 40
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hi."}]
    first = chat(client, messages=messages, max_tokens=4, temperature=0)
    second = chat(client, messages=[messages[0], {"role": "user", "content": "Say bye."}], max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens > 200
    assert second.usage.prompt_tokens_details.cached_tokens > 200


def test_16_concurrent_requests_equal_the_same_sent_one_by_one(client):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    def one(p):
        return chat(client, messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0).choices[0].message.content

    sequential = [one(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        concurrent_ = list(pool.map(one, prompts))
    assert concurrent_ == sequential


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": MODEL_NAME, "messages": CHAT, "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL_NAME, "messages": CHAT, "temperature": -1}, 400, "temperature"),
        ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
        ({"model": "no-such-model", "messages": CHAT}, 404, "model"),
        ({"model": MODEL_NAME, "messages": CHAT, "frobnicate": True}, 400, "frobnicate"),
        ({"model": MODEL_NAME, "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"model": MODEL_NAME, "messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "messages"),
        ({"model": MODEL_NAME, "messages": CHAT, "max_tokens": 100000}, 400, "messages"),
        ({"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert err["param"] == param


def test_malformed_json_and_wrong_methods(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"[]", timeout=10)
    assert r.status_code == 400
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [999999]}, timeout=10)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError):
        chat(client, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)


def test_metrics_publish_braid_and_vllm_names(server, client):
    chat(client, max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in [
        "braid_requests_running",
        "braid_requests_waiting",
        "braid_kv_cache_usage_ratio",
        "braid_prefix_hit_tokens_total",
        "braid_prefilled_tokens_total",
        "braid_generated_tokens_total",
        "braid_time_to_first_token_seconds",
        "braid_time_per_output_token_seconds",
        "braid_e2e_request_latency_seconds",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ]:
        assert name in text, name


def test_braid_bench_measures_a_running_server(server, tmp_path):
    import subprocess

    from conftest import BINARY, ROOT

    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    run = subprocess.run(
        [str(BINARY), "bench", "--url", server.url, "--sweep", "c=1,2", "-n", "4", "--input-len", "32", "--output-len", "8",
         "--ignore-eos", "--slo", "ttft=60000,tpot=60000", "--json", str(out), "--plot", str(plot), "--label", "braid"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["model"] == MODEL_NAME and len(report["runs"]) == 2
    for r in report["runs"]:
        m = r["metrics"]
        assert m["completed"] == 4 and m["failed"] == 0
        assert m["total_output_tokens"] == 32, "ignore_eos fixes the output length"
        assert m["ttft_ms"]["p50"] > 0 and m["tpot_ms"]["p50"] > 0 and m["output_throughput"] > 0
        assert m["goodput"] == pytest.approx(m["request_throughput"])
        assert len(r["requests"]) == 4 and all(q["status"] == 200 for q in r["requests"])
    assert plot.stat().st_size > 10_000
    assert "out tok/s" in run.stdout


def test_a_temperature_below_the_floor_is_greedy_and_the_server_lives_on(client, server):
    # `"temperature": 1e-40` once overflowed 1/T, panicked the draw and stopped the engine for
    # good (every later request a 500). Below 1e-5 it is greedy now, as in vLLM.
    greedy = chat(client, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    assert chat(client, max_tokens=12, temperature=1e-40).choices[0].message.content == text
    assert chat(client, max_tokens=12, temperature=1e-40, top_p=0.5).choices[0].message.content == text
    r = chat(client, max_tokens=12, temperature=1e-40, logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == text
    for item in r.choices[0].logprobs.content:
        assert item.token == item.top_logprobs[0].token and item.logprob <= 0
    stream = chat(client, max_tokens=12, temperature=1e-40, top_p=0.5, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    legacy = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=1e-40, seed=-(2**63))
    assert legacy.choices[0].text == client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=0).choices[0].text
    # The server goes on answering, and reports itself healthy.
    assert chat(client, max_tokens=4, temperature=0).choices[0].message.content
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logit_bias": {"49152": 5}}, "logit_bias"),  # the vocabulary is 49,152 tokens
        ({"logit_bias": {"7": 1, "007": 1}}, "logit_bias"),  # one token twice
        ({"stop": "x" * 257}, "stop"),
        ({"stop": ["ok", "é" * 129]}, "stop"),  # 258 bytes in 129 characters
    ],
)
def test_out_of_vocabulary_biases_and_long_stop_strings_are_400(server, extra, param):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    legacy = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **extra}
    assert httpx.post(server.url + "/v1/completions", json=legacy, timeout=30).json()["error"]["param"] == param


def test_extreme_but_meaningful_values_are_answered(client, server):
    # A 256-byte stop string, the vocabulary's last token biased, every token but one at -100,
    # the largest max_tokens (a 400 naming the context, not an overflow).
    assert chat(client, max_tokens=4, temperature=0, stop=["y" * 256]).choices[0].message.content
    assert chat(client, max_tokens=4, temperature=0, logit_bias={"49151": 100}).choices[0].finish_reason
    # (A top-p below f32's range keeps the best token, as the smallest positive one does.)
    only = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=1.0, top_p=1e-300, logit_bias={str(i): -100 for i in range(49152) if i != 1000}, logprobs=2)
    token = httpx.post(server.url + "/detokenize", json={"tokens": [1000]}, timeout=10).json()["prompt"]
    assert only.choices[0].logprobs.tokens == [token] * 3
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2**63 - 1}, timeout=30)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
