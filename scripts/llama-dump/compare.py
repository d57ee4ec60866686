"""Compares braid's dumped tensors (BRAID_DUMP_DIR) with llama.cpp's (dump.cpp), step by step:
for each tensor, how many elements are bit-identical and the largest difference. Step 0 is the
prefill of the prompt, each later step one decoded token.

Usage: compare.py BRAID_DIR LLAMA_DIR PROMPT_LEN N_STEPS
"""
import glob
import sys

import numpy as np


def llama(d, step, name, op):
    files = glob.glob(f"{d}/s{step}_{name}_{op}.bin")
    return np.fromfile(files[0], dtype=np.float32) if len(files) == 1 else None


def braid(d, step, name):
    return np.fromfile(f"{d}/s{step}_{name}.bin", dtype=np.float32)


def side_by_side(parts, rows):
    """llama.cpp's separate products as braid's stacked one: each row [a | b | ...]."""
    if any(p is None for p in parts):
        return None
    return np.concatenate([p.reshape(rows, -1) for p in parts], axis=1).ravel()


def main():
    bd, ld = sys.argv[1], sys.argv[2]
    prompt_len, n_steps = (int(a) for a in sys.argv[3:5])
    n_layers = len(glob.glob(f"{bd}/s0_attn_norm-*.bin"))
    inexact = 0
    for step in range(n_steps + 1):
        rows = prompt_len if step == 0 else 1
        pairs = [("embd", "embd", llama(ld, step, "inp_embd", "GET_ROWS"))]
        for l in range(n_layers):
            pairs += [
                (f"attn_norm-{l}", f"attn_norm-{l}", llama(ld, step, f"attn_norm-{l}", "MUL")),
                (f"qkv-{l}", f"qkv-{l}", side_by_side([llama(ld, step, f"{x}cur-{l}", "MUL_MAT") for x in "QKV"], rows)),
                (f"Qcur-{l} (rope)", f"Qcur-{l}", llama(ld, step, f"Qcur-{l}", "ROPE")),
                (f"Kcur-{l} (rope)", f"Kcur-{l}", llama(ld, step, f"Kcur-{l}", "ROPE")),
                (f"kqv_out-{l}", f"kqv_out-{l}", llama(ld, step, f"kqv_out-{l}", "RESHAPE")),
                (f"ffn_inp-{l}", f"ffn_inp-{l}", llama(ld, step, f"ffn_inp-{l}", "ADD")),
                (f"gate_up-{l}", f"gate_up-{l}", None),
                (f"ffn_swiglu-{l}", f"ffn_swiglu-{l}", llama(ld, step, f"ffn_swiglu-{l}", "SWIGLU")),
                (f"l_out-{l}", f"l_out-{l}", llama(ld, step, f"l_out-{l}", "ADD")),
            ]
            gate, up = llama(ld, step, f"ffn_gate-{l}", "MUL_MAT"), llama(ld, step, f"ffn_up-{l}", "MUL_MAT")
            if gate is not None:
                pairs[-3] = (f"gate_up-{l}", f"gate_up-{l}", side_by_side([gate, up], len(gate) * rows // len(braid(bd, step, f"ffn_swiglu-{l}"))))
        pairs.append(("result_output", "result_output", llama(ld, step, "result_output", "MUL_MAT")))
        for label, name, theirs in pairs:
            if theirs is None:
                continue
            ours = braid(bd, step, name)
            # In the last layer llama.cpp computes only the rows it outputs: compare those.
            ours = ours[len(ours) - len(theirs):]
            same = int(np.sum(ours.view(np.uint32) == theirs.view(np.uint32)))
            diff = float(np.max(np.abs(ours.astype(np.float64) - theirs))) if len(ours) else 0.0
            inexact += same != len(ours)
            print(f"step {step} {label:18s} identical {same:7d}/{len(ours):7d}  max |diff| {diff:.3e}")
    print(f"{inexact} tensors not bit-identical")
    sys.exit(1 if inexact else 0)


if __name__ == "__main__":
    main()
