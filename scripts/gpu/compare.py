"""Compares two `braid generate --json` outputs token for token (first N generated tokens).

    python3 compare.py expected.jsonl actual.jsonl 16 "GPU vs CPU"
"""
import json
import sys

want_path, got_path, n, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
want = [json.loads(l) for l in open(want_path) if l.strip()]
got = [json.loads(l) for l in open(got_path) if l.strip()]
assert len(want) == len(got), f"{label}: {len(want)} vs {len(got)} prompts"
same = 0
for i, (w, g) in enumerate(zip(want, got)):
    assert w["prompt_ids"] == g["prompt_ids"], f"{label}: prompt {i} differs"
    a, b = w["ids"][:n], g["ids"][:n]
    if a == b:
        same += 1
    else:
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        note = ""
        if "logprobs" in w and first < len(a):
            # How close the expected side's two leading candidates were where the outputs parted.
            row = w["logprobs"][first][1]
            note = f" (expected side's top-2 logprob margin there: {row[0][1] - row[1][1]:.2e})" if len(row) > 1 else ""
        print(f"{label}: prompt {i} differs from token {first}: {a[first:first + 4]} vs {b[first:first + 4]}{note}")
print(f"{label}: {same}/{len(want)} prompts equal over the first {n} tokens")
sys.exit(0 if same == len(want) else 1)
