"""A server on dummy weights (`--load-format dummy`): token-id prompts work, text prompts and
chat are refused with a 400 that says why."""

import httpx
import pytest

from conftest import Server


@pytest.fixture(scope="module")
def dummy():
    s = Server("--device", "cpu", "--load-format", "dummy", "--model-config", "smollm2-135m")
    yield s
    s.stop()


def test_token_id_prompts_generate(dummy):
    r = httpx.post(dummy.url + "/v1/completions", json={
        "model": "smollm2", "prompt": [[1, 2, 3, 4, 5], [9, 8, 7]], "max_tokens": 5, "temperature": 0,
    }, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 10  # no end-of-sequence token in a dummy model
    assert all(c["text"].startswith("<") for c in body["choices"])  # ids shown as <id>


def test_text_prompts_and_chat_are_refused(dummy):
    r = httpx.post(dummy.url + "/v1/completions", json={"model": "smollm2", "prompt": "hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    assert "token ids" in r.json()["error"]["message"]
    r = httpx.post(dummy.url + "/v1/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 400, r.text
