"""Compares two `braid generate --json` outputs token for token (first N generated tokens).

    python3 compare.py expected.jsonl actual.jsonl 16 "GPU vs CPU" [NEAR_TIE]

Exits 0 when every prompt's tokens are equal. With NEAR_TIE (a log-probability margin; the
expected side must carry logprobs, `--top-logprobs 2`), a prompt may also part where the
expected side's two likeliest tokens were closer than NEAR_TIE: a near-tie that two correct
implementations summing in different orders can decide either way. Parting anywhere else fails.
"""
import json
import sys

want_path, got_path, n, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
near_tie = float(sys.argv[5]) if len(sys.argv) > 5 else None
want = [json.loads(l) for l in open(want_path) if l.strip()]
got = [json.loads(l) for l in open(got_path) if l.strip()]
assert want, f"{label}: no outputs in {want_path}"
assert len(want) == len(got), f"{label}: {len(want)} vs {len(got)} prompts"
same, at_near_ties = 0, 0
for i, (w, g) in enumerate(zip(want, got)):
    assert w["prompt_ids"] == g["prompt_ids"], f"{label}: prompt {i} differs"
    a, b = w["ids"][:n], g["ids"][:n]
    if a == b:
        same += 1
        continue
    first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    margin = None
    if "logprobs" in w and first < len(a):
        # How close the expected side's two leading candidates were where the outputs parted.
        row = w["logprobs"][first][1]
        margin = row[0][1] - row[1][1] if len(row) > 1 else None
    note = f" (expected side's top-2 logprob margin there: {margin:.2e})" if margin is not None else ""
    if near_tie is not None and margin is not None and margin < near_tie:
        at_near_ties += 1
    print(f"{label}: prompt {i} differs from token {first}: {a[first:first + 4]} vs {b[first:first + 4]}{note}")
tail = f"; {at_near_ties} part at a near-tie (margin < {near_tie})" if near_tie is not None else ""
ok = same + at_near_ties == len(want)
print(f"{label}: {same}/{len(want)} prompts equal over the first {n} tokens{tail}: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
