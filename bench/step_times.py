"""Seconds per GRPO step of a finished (or running) run, from its metrics.jsonl.

    python bench/step_times.py runs/default

Prints a markdown table: per iteration and stage, the number of steps and the mean seconds spent
sampling (rollout), scoring (rewards, including the frozen reasoner's answers for the questioner)
and training (old/reference log-probs and the optimizer updates).
"""

import json
import os
import sys
from collections import defaultdict


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = os.path.join(sys.argv[1], "metrics.jsonl")
    groups = defaultdict(list)
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            groups[(row["iteration"], row["stage"])].append(row)
    keys = ("seconds_sampling", "seconds_scoring", "seconds_training")
    print("| iteration | stage | steps | sampling (s) | scoring (s) | training (s) "
          "| total per step (s) |")
    print("|---|---|---|---|---|---|---|")
    for (iteration, stage), rows in sorted(groups.items()):
        means = [sum(r[k] for r in rows) / len(rows) for k in keys]
        print(f"| {iteration} | {stage} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means) +
              f" | {sum(means):.2f} |")


if __name__ == "__main__":
    main()
