"""Models other than the default over HTTP with the official client: a Hugging Face folder
(a tiny Qwen3 fixture, its chat template from `chat_template.jinja`), a GGUF made from one by
`braid convert`, and Gemma 3 270M's Q4_K_M GGUF (a base model: completions, no chat template)."""

import json
import subprocess

import openai
import pytest

from conftest import BINARY, MODEL_NAME, ROOT, Server


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def qwen3_folder():
    s = Server("--model", "tests/fixtures/tiny/qwen3")
    yield s
    s.stop()


def test_a_hugging_face_folder_serves_chat_and_completions(qwen3_folder):
    c = client(qwen3_folder)
    chat = c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert chat.usage.completion_tokens > 0
    text = c.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=8, temperature=0)
    assert text.usage.completion_tokens == 8 or text.choices[0].finish_reason == "stop"


def test_a_converted_folder_gives_the_folders_tokens(qwen3_folder, tmp_path):
    out = tmp_path / "qwen3-f32.gguf"
    subprocess.run([str(BINARY), "convert", "tests/fixtures/tiny/qwen3", str(out), "--quantize", "f32"], cwd=ROOT, check=True)
    converted = Server("--model", str(out))
    try:
        ask = dict(model=MODEL_NAME, prompt="the quick brown fox", max_tokens=12, temperature=0)
        folder = client(qwen3_folder).completions.create(**ask).choices[0].text
        gguf = client(converted).completions.create(**ask).choices[0].text
        # The folder computes in bf16, the f32 GGUF in f32: greedy runs could part at a near tie,
        # which this prompt's 12 tokens do not have.
        assert folder == gguf, (folder, gguf)
    finally:
        converted.stop()


def test_gemma3_q4_k_m_completes_and_refuses_chat():
    gemma = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert gemma.exists(), "run scripts/install-model gemma3"
    s = Server("--model", str(gemma))
    try:
        c = client(s)
        # llama.cpp's greedy continuation of the first golden prompt (a weak base model: judged
        # by agreement with the reference, not by how it reads).
        golden = json.loads((ROOT.parent / "shared/golden/gemma3-270m/greedy.jsonl").read_text().splitlines()[0])
        r = c.completions.create(model=MODEL_NAME, prompt=golden["prompt"], max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and golden["text"].startswith(r.choices[0].text), (r, golden["text"])
        # A base model ships no chat template: a chat request is a clear 400, not a guess.
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    finally:
        s.stop()


def test_max_model_len_caps_the_context():
    s = Server("--model", "tests/fixtures/tiny/qwen3", "--max-model-len", "16")
    try:
        c = client(s)
        # This prompt and 8 more tokens pass 16: refused with the context-length error.
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL_NAME, prompt="the quick brown fox jumps over", max_tokens=8)
        assert "16" in str(e.value)
        ok = c.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=4, temperature=0)
        assert ok.usage.prompt_tokens + ok.usage.completion_tokens <= 16
    finally:
        s.stop()
