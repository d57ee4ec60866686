"""Fuzzes braid's HTTP API from its own OpenAPI document (GET /openapi.json) with schemathesis:
every generated request, valid or not, gets a 2xx or 4xx answer in time, never a 5xx or a hang,
and the server is left idle and answering."""

import collections
import json
import time

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from conftest import MODEL_NAME, Server

# Seconds any one request may take: the largest valid ones generate 16 choices of a few tokens.
REQUEST_TIMEOUT = 60
# Tokens a fuzzed request may generate: enough to run the sampler over several steps, few
# enough that some hundreds of requests end in minutes on two cores.
MAX_TOKENS = 4
# Random cases per operation, of each of valid and invalid requests.
FUZZ_EXAMPLES = 60
# Above this a max_tokens is left alone: with any prompt it passes the context, a 400.
HUGE = 1 << 20


@pytest.fixture(scope="module")
def fuzz_server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def bounded(body):
    """The body with the work it asks for bounded: a missing max_tokens (which runs to the end of
    the context) or a moderate one becomes MAX_TOKENS; huge, zero, negative or mistyped ones
    stay as generated (they must get a 400)."""
    if not isinstance(body, dict):
        return body
    # (A null is no limit, as a missing field is.)
    fields = [f for f in ("max_tokens", "max_completion_tokens") if body.get(f) is not None]
    for f in fields:
        v = body[f]
        # (16.0 is an integer to JSON, and to braid.)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and MAX_TOKENS < v < HUGE:
            body[f] = MAX_TOKENS
    if not fields:
        body["max_tokens"] = MAX_TOKENS
    return body


def test_the_document_describes_every_route_and_its_bodies(fuzz_server):
    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"] == "3.1.0"
    paths = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert paths >= {
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/models", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/tokenize", "post"),
        ("/detokenize", "post"),
    }
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatRequest"]
    # Unknown fields are refused, as the server refuses them; the model is the served one.
    assert chat["additionalProperties"] is False and set(chat["required"]) == {"model", "messages"}
    assert chat["properties"]["model"]["enum"] == [MODEL_NAME]
    assert chat["properties"]["temperature"]["maximum"] == 2
    assert chat["properties"]["stop"]["oneOf"][0]["maxLength"] == 256
    completion = schemas["CompletionRequest"]
    assert completion["additionalProperties"] is False and {"prompt", "logit_bias", "n"} <= set(completion["properties"])
    # Token ids are bounded by this model's vocabulary: the last one detokenizes, the next is a 400.
    last = completion["properties"]["prompt"]["oneOf"][2]["items"]["maximum"]
    assert httpx.post(fuzz_server.url + "/detokenize", json={"tokens": [last]}, timeout=10).status_code == 200
    assert httpx.post(fuzz_server.url + "/detokenize", json={"tokens": [last + 1]}, timeout=10).status_code == 400
    for name in ("TokenizeRequest", "DetokenizeRequest", "Message", "StreamOptions"):
        assert schemas[name]["additionalProperties"] is False, name


def assert_idle_and_answering(server):
    """Nothing left running or queued (within a few seconds), and a plain request answered."""
    deadline = time.time() + 30
    while True:
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 200
        idle = (health.json()["running"], health.json()["waiting"]) == (0, 0)
        if idle or time.time() > deadline:
            break
        time.sleep(0.5)
    assert idle, health.text
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_no_generated_request_gets_a_5xx_or_hangs(api_schema, fuzz_server):
    """Per operation: schemathesis' coverage cases (each field at its bounds, missing, of the
    wrong type), then FUZZ_EXAMPLES random cases valid by the document and as many invalid ones.
    (Hypothesis drives the generation directly: the pytest plugin's lazy schemas do not run
    under pytest 9.)"""
    failures = []
    answered = collections.Counter()

    def send(case):
        if case.operation.path in ("/v1/chat/completions", "/v1/completions"):
            case.body = bounded(case.body)
        start = time.monotonic()
        try:
            response = case.call(timeout=REQUEST_TIMEOUT)
        except requests.exceptions.Timeout:
            health = httpx.get(case.operation.base_url + "/health", timeout=5).text
            failures.append(f"no answer in {REQUEST_TIMEOUT} s ({health}): {case.operation.label} {json.dumps(case.body)[:2000]}")
            return
        answered[(case.operation.label, response.status_code // 100)] += 1
        if response.status_code >= 500:
            took = time.monotonic() - start
            failures.append(f"{response.status_code} after {took:.1f} s: {response.text[:300]}\n  {case.operation.label} {json.dumps(case.body)[:2000]}")

    sent = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        config = api_schema.config.generation_for(operation=operation)
        for case in api_schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode), generation_config=config):
            send(case)
            sent += 1
        # (A GET without parameters has no invalid form.)
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if len(operation.body) else [GenerationMode.POSITIVE]
        for mode in modes:

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            @given(operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                nonlocal sent
                send(case)
                sent += 1

            fuzz()
    assert sent > 500
    # The valid cases reached the engine (not only the parsers).
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize"):
        assert answered[(label, 2)] >= 10, answered
    assert not failures, f"{len(failures)} of {sent} requests failed:\n" + "\n".join(failures[:20])
    assert_idle_and_answering(fuzz_server)


# Values every numeric field is sent at besides its bounds: tiny (a temperature whose inverse
# overflows f32 once it is one: 1e-40 killed the engine), subnormal, huge, and integer extremes.
EXTREMES = [0, -0.0, 1e-40, 1e-38, 5e-324, 9.9e-6, 1e-5, 1e30, -1e30, 1e308, 2**63 - 1, -(2**63), 2**64]


def test_every_numeric_field_at_its_extremes_gets_a_2xx_or_4xx(fuzz_server):
    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    vocab = schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"][2]["items"]["maximum"] + 1
    bases = {
        "/v1/chat/completions": ("ChatRequest", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count to ten."}]}),
        "/v1/completions": ("CompletionRequest", {"model": MODEL_NAME, "prompt": "One, two,"}),
    }
    # Fields at an extreme together, and biases on many tokens.
    combos = [
        {"temperature": 1e-40, "top_p": 1e-40, "min_p": 1, "top_k": 2**63 - 1},
        {"temperature": 2, "top_p": 1, "min_p": 0, "repetition_penalty": 0.01, "presence_penalty": -2, "frequency_penalty": -2},
        {"temperature": 1e-40, "repetition_penalty": 10, "presence_penalty": 2, "frequency_penalty": 2, "seed": -(2**63)},
        {"logit_bias": {str(i): -100 for i in range(vocab) if i != 1000}, "temperature": 1.5, "top_p": 0.3},
        {"logit_bias": {str(i): 100 for i in range(0, vocab, 3)}, "temperature": 1e-40, "seed": 2**63 - 1},
    ]
    failures, sent = [], 0
    for path, (name, base) in bases.items():
        bodies = [{**base, **c} for c in combos]
        for field, prop in schemas[name]["properties"].items():
            types = prop.get("type", [])
            if not ({"number", "integer"} & set(types if isinstance(types, list) else [types])):
                continue
            bounds = [prop[k] for k in ("minimum", "maximum", "exclusiveMinimum") if k in prop]
            bodies += [{**base, field: v} for v in bounds + EXTREMES]
        for body in bodies:
            body = bounded(body)
            for extra in ({}, {"logprobs": True, "top_logprobs": 5} if name == "ChatRequest" else {"logprobs": 5}, {"stream": True}):
                try:
                    r = httpx.post(fuzz_server.url + path, json={**body, **extra}, timeout=REQUEST_TIMEOUT)
                except httpx.TimeoutException:
                    failures.append(f"no answer in {REQUEST_TIMEOUT} s: {path} {json.dumps(body)[:300]}")
                    continue
                sent += 1
                if r.status_code >= 500 or "server_error" in r.text:  # (a stream's error comes after its 200)
                    failures.append(f"{r.status_code}: {r.text[:200]}\n  {path} {json.dumps({**body, **extra})[:300]}")
    assert sent > 200
    assert not failures, f"{len(failures)} of {sent} requests failed:\n" + "\n".join(failures[:20])
    assert_idle_and_answering(fuzz_server)


def test_responses_are_the_ones_the_document_describes(fuzz_server):
    """Every kind of body the server sends (completions and their stream chunks, with logprobs and
    usage; models, tokenize, detokenize, health, errors) validates against the named schema the
    document gives for its route and status, and holds no field the schema leaves out."""
    import jsonschema

    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    # The response schemas as strict as the request ones: a field sent must be described.
    components = json.loads(json.dumps(doc["components"]))
    for schema in components["schemas"].values():
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)

    def check(method, path, response, content="application/json"):
        described = doc["paths"][path][method]["responses"][str(response.status_code)]["content"][content]["schema"]
        assert "$ref" in described, f"{method} {path} {response.status_code}: described loosely as {described}"
        validator = jsonschema.Draft202012Validator({**described, "components": components})
        if content == "text/event-stream":
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            bodies = [json.loads(e) for e in events[:-1]]
        else:
            bodies = [response.json()]
        for body in bodies:
            validator.validate(body)
        return bodies

    url = fuzz_server.url
    messages = [{"role": "user", "content": "Name three colours."}]
    chat = {"model": MODEL_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": 1, "n": 2, "logprobs": True, "top_logprobs": 2}
    completion = {"model": MODEL_NAME, "prompt": ["Red, green,", "One, two,"], "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 2}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    check("post", "/v1/chat/completions", httpx.post(url + "/v1/chat/completions", json=chat, timeout=REQUEST_TIMEOUT))
    chunks = check("post", "/v1/chat/completions", httpx.post(url + "/v1/chat/completions", json={**chat, **usage}, timeout=REQUEST_TIMEOUT), "text/event-stream")
    assert chunks[-1]["usage"]["total_tokens"] > 0 and all("usage" in c for c in chunks)
    check("post", "/v1/chat/completions", httpx.post(url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=REQUEST_TIMEOUT), "text/event-stream")
    check("post", "/v1/completions", httpx.post(url + "/v1/completions", json=completion, timeout=REQUEST_TIMEOUT))
    check("post", "/v1/completions", httpx.post(url + "/v1/completions", json={**completion, **usage}, timeout=REQUEST_TIMEOUT), "text/event-stream")
    check("get", "/v1/models", httpx.get(url + "/v1/models", timeout=10))
    check("post", "/tokenize", httpx.post(url + "/tokenize", json={"messages": messages}, timeout=10))
    check("post", "/detokenize", httpx.post(url + "/detokenize", json={"tokens": [1, 2, 3]}, timeout=10))
    check("get", "/health", httpx.get(url + "/health", timeout=10))
    # Errors: a field out of range, and a model that is not served.
    bad = httpx.post(url + "/v1/completions", json={**completion, "temperature": 5}, timeout=10)
    assert bad.status_code == 400 and check("post", "/v1/completions", bad)[0]["error"]["param"] == "temperature"
    missing = httpx.post(url + "/v1/chat/completions", json={**chat, "model": "nope"}, timeout=10)
    assert missing.status_code == 404 and check("post", "/v1/chat/completions", missing)[0]["error"]["code"] == "model_not_found"
