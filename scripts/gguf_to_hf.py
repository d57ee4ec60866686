"""Convert a llama-architecture GGUF file to a Hugging Face model folder (for mlx_lm).

Usage: python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype float32|float16]

Writes OUT_DIR/model.safetensors, config.json, tokenizer.json and tokenizer_config.json.
Every tensor is dequantized (gguf.quants.dequantize) to --dtype, so the peer computes with the
weight values braid and llama.cpp decode from the quantized blocks. float32 is the default: MLX's
CPU backend runs float16 matmuls several times slower than float32 ones (which go to cblas_sgemm).
Two things undo llama.cpp's converter:
  - tensor names go back to the Hugging Face llama names;
  - the rows of Q and K are un-permuted: llama.cpp interleaves the two rotary halves of each head
    for its rope, Hugging Face (and MLX) rotate the halves as they are.
The tokenizer is rebuilt from the GGUF vocabulary: byte-level BPE, with the 'smollm' pre-tokenizer
(each digit on its own, then GPT-2's byte-level split) and the control tokens as special tokens.
Needs the packages gguf, numpy, safetensors and tokenizers.
"""

import argparse
import json
import os
import re

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens


def hf_name(name):
    """GGUF tensor name -> Hugging Face llama name."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise ValueError(f"unknown tensor {name}")
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"


def unpermute(w, n_head):
    """Inverse of llama.cpp's w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tokenizer(fields):
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    pre = fields["tokenizer.ggml.pre"].contents()
    if fields["tokenizer.ggml.model"].contents() != "gpt2" or pre not in ("smollm", "gpt2"):
        raise ValueError(f"only byte-level BPE with the smollm/gpt2 pre-tokenizer is handled, not {pre}")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    return tok, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args()

    reader = GGUFReader(args.gguf)
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"only the llama architecture is handled, not {arch}")
    meta = lambda key, default=None: fields[key].contents() if key in fields else default
    f32 = lambda x: float(str(np.float32(x)))  # GGUF stores float32: 1e-05, not 9.99999974e-06
    n_head = meta("llama.attention.head_count")
    n_head_kv = meta("llama.attention.head_count_kv", n_head)

    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)  # numpy shape is GGUF's reversed: (out, in)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_head_kv)
        weights[hf_name(t.name)] = np.ascontiguousarray(w.astype(args.dtype))
    tied = "lm_head.weight" not in weights

    tok, tokens = build_tokenizer(fields)
    bos = meta("tokenizer.ggml.bos_token_id")
    eos = meta("tokenizer.ggml.eos_token_id")
    hidden = meta("llama.embedding_length")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta("llama.feed_forward_length"),
        "num_hidden_layers": meta("llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": meta("llama.rope.dimension_count", hidden // n_head),
        "rms_norm_eps": f32(meta("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32(meta("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("llama.context_length"),
        "vocab_size": len(tokens),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": args.dtype,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "unk_token": tokens[meta("tokenizer.ggml.unknown_token_id", 0)],
        "pad_token": tokens[meta("tokenizer.ggml.padding_token_id", eos)],
        "add_bos_token": bool(meta("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta("llama.context_length"),
        "chat_template": meta("tokenizer.chat_template"),
    }

    os.makedirs(args.out, exist_ok=True)
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    tok.save(os.path.join(args.out, "tokenizer.json"))
    for name, obj in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(obj, f, indent=2)
    print(f"wrote {args.out}: {len(weights)} tensors ({args.dtype}), vocab {len(tokens)}, tied={tied}")


if __name__ == "__main__":
    main()
