"""The side-by-side baseline for braid's GPU numbers: Hugging Face transformers generating with a
random-weight model of the same shape (bf16, on the same GPU, in the same run).

    python3 hf_baseline.py llama-3.2-1b 1 32 256

Prints one JSON line per batch size: static-batch generate of 128-token prompts, 128 new tokens.
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def main():
    name, batches = sys.argv[1], [int(b) for b in sys.argv[2:]]
    config = LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0, **SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    for batch in batches:
        ids = torch.randint(0, config.vocab_size, (batch, 128), device="cuda")
        mask = torch.ones_like(ids)
        run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with torch.inference_mode():
            run(8)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = run(128)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        generated = (out.shape[1] - 128) * batch
        print(json.dumps({"system": "hf-transformers " + __import__("transformers").__version__, "model": name,
                          "batch": batch, "generated": generated, "seconds": round(seconds, 4),
                          "tok_s": round(generated / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
