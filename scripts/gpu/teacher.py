"""Teacher-forced comparison of the GPU's greedy tokens with the CPU's.

    python3 teacher.py prompts cpu.jsonl            # one prompt per prefix of each CPU output
    python3 teacher.py score cpu.jsonl gpu.jsonl L  # the GPU's next token vs the CPU's

The CPU output must carry logprobs (`braid generate --json --top-logprobs 2`): each
disagreement is reported with the CPU's margin between its two best candidates, which says
whether it is a near-tie that last-bit rounding differences can flip.
"""
import json
import sys

cpu = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
if sys.argv[1] == "prompts":
    for row in cpu:
        for j in range(len(row["ids"])):
            print(json.dumps({"prompt_ids": row["prompt_ids"] + row["ids"][:j]}))
    sys.exit(0)

gpu = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
label = sys.argv[4]
agree, margins, k = 0, [], 0
for row in cpu:
    for j, want in enumerate(row["ids"]):
        got = gpu[k]["ids"][0]
        assert gpu[k]["prompt_ids"] == row["prompt_ids"] + row["ids"][:j]
        k += 1
        if got == want:
            agree += 1
        else:
            top = row["logprobs"][j][1]
            margins.append(top[0][1] - top[1][1])
print(f"{label}: teacher-forced top-1 agrees at {agree}/{k} positions; CPU top-2 margins at the others: "
      + (", ".join(f"{m:.1e}" for m in sorted(margins)) or "none"))
