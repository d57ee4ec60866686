"""Teacher-forced comparison of the GPU's greedy tokens with the CPU's.

    python3 teacher.py prompts cpu.jsonl                     # one prompt per prefix of each CPU output
    python3 teacher.py score cpu.jsonl gpu.jsonl L NEAR_TIE  # the GPU's next token vs the CPU's
    python3 teacher.py pair a.jsonl b.jsonl L                # two teacher-forced runs on the same prompts

Both outputs must carry logprobs (`braid generate --json --top-logprobs 2`). At every prefix the
GPU's log-probability of its token is compared with the CPU's (the arithmetic's agreement), and
every token they disagree on is reported with the CPU's margin between its two best candidates.
Exits 0 when each log-probability of a shared token is within NEAR_TIE of the CPU's and each
disagreement sits at a CPU margin below NEAR_TIE: a near-tie that rounding can decide.
`pair` reports the same agreement between two GPU runs (the two modes: two correct summation
orders on one machine), the yardstick for what rounding alone does.
"""
import json
import sys


def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def spread(diffs):
    """Median and max of absolute log-probability differences, for the report."""
    diffs = sorted(diffs)
    return f"median {diffs[len(diffs) // 2]:.1e}, max {diffs[-1]:.1e}"


if sys.argv[1] == "prompts":
    for row in rows(sys.argv[2]):
        for j in range(len(row["ids"])):
            print(json.dumps({"prompt_ids": row["prompt_ids"] + row["ids"][:j]}))
    sys.exit(0)

if sys.argv[1] == "pair":
    a, b = rows(sys.argv[2]), rows(sys.argv[3])
    assert a and [r["prompt_ids"] for r in a] == [r["prompt_ids"] for r in b], "not the same prompts"
    shared = [abs(x["logprobs"][0][0] - y["logprobs"][0][0]) for x, y in zip(a, b) if x["ids"][0] == y["ids"][0]]
    print(f"{sys.argv[4]}: teacher-forced top-1 agrees at {len(shared)}/{len(a)} positions; "
          f"|difference| in log-probability of the shared tokens: {spread(shared)}")
    sys.exit(0)

cpu, gpu = rows(sys.argv[2]), rows(sys.argv[3])
assert cpu and len(gpu) == sum(len(r["ids"]) for r in cpu), f"{sys.argv[3]}: not one output per prefix of {sys.argv[2]}"
label, near_tie = sys.argv[4], float(sys.argv[5])
agree, k, margins, diffs = 0, 0, [], []
for row in cpu:
    for j, want in enumerate(row["ids"]):
        assert gpu[k]["prompt_ids"] == row["prompt_ids"] + row["ids"][:j]
        got, got_logprob = gpu[k]["ids"][0], gpu[k]["logprobs"][0][0]
        k += 1
        if got == want:
            agree += 1
            diffs.append(abs(got_logprob - row["logprobs"][j][0]))
        else:
            top = row["logprobs"][j][1]
            margins.append(top[0][1] - top[1][1])
ok = all(m < near_tie for m in margins) and all(d < near_tie for d in diffs)
print(f"{label}: teacher-forced top-1 agrees at {agree}/{k} positions; CPU top-2 margins at the others: "
      + (", ".join(f"{m:.1e}" for m in sorted(margins)) or "none")
      + f"; |GPU - CPU| log-probability of the shared tokens: {spread(diffs)}"
      + f" (near-tie bound {near_tie}): {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
