"""What Vision-Zero's embedded run shows, per seed: spy-identification accuracy and n/a rate over
training, the stage sequence, and the held-out toy benchmark before and after (README
"Vision-Zero"). Runs `python visplay.py --config configs/vision-zero.yaml` once per seed (each in
its own run directory; a finished one is reused) and prints one markdown table.

    python benchmarks/vision_zero_claim.py --seeds 0 1 2 --out runs/vision-zero-claim

Seeds other than 0 build their own toy base first (about 18 minutes each on 2 cores).
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import read_jsonl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stages(rows):
    """The stage sequence, run-length encoded: "decision x20, clue x5, ..."."""
    runs = []
    for row in rows:
        if runs and runs[-1][0] == row["phase"]:
            runs[-1][1] += 1
        else:
            runs.append([row["phase"], 1])
    return ", ".join(f"{phase} x{count}" for phase, count in runs)


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def seed_row(folder, window):
    """One seed's figures from its finished run directory."""
    evals = []
    for i in (0, 1):
        with open(os.path.join(folder, f"eval_v{i}.json")) as f:
            evals.append(json.load(f)["toyworld"])
    rows = [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if r.get("stage") == "spy"]
    rows.sort(key=lambda r: r["step"])
    first, last = rows[:window], rows[-window:]
    absent = [e.get("by_category", {}).get("exists", {}).get("accuracy") for e in evals]
    return {"before": 100 * evals[0]["accuracy"], "after": 100 * evals[1]["accuracy"],
            "vote_first": 100 * mean([r["vote_acc"] for r in first]),
            "vote_last": 100 * mean([r["vote_acc"] for r in last]),
            "plural_first": 100 * mean([r["plurality_acc"] for r in first]),
            "plural_last": 100 * mean([r["plurality_acc"] for r in last]),
            "na_first": 100 * mean([r["na_rate"] for r in first]),
            "na_last": 100 * mean([r["na_rate"] for r in last]),
            "exists": absent, "stages": stages(rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/vision-zero-claim")
    parser.add_argument("--window", type=int, default=5, help="updates averaged at each end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every seed (repeatable)")
    args = parser.parse_args(argv)
    table = ["| seed | toyworld before | after | change | vote acc first / last "
             f"{args.window} | plurality acc first / last | n/a first / last | exists before / "
             "after | stages |", "|---" * 9 + "|"]
    for seed in args.seeds:
        folder = os.path.join(args.out, f"seed{seed}")
        if not os.path.exists(os.path.join(folder, "eval_v1.json")):
            command = [sys.executable, os.path.join(ROOT, "visplay.py"), "--config",
                       os.path.join(ROOT, "configs", "vision-zero.yaml"), "--set",
                       f"run_dir={folder}", "--set", f"seed={seed}"]
            for override in args.set:
                command += ["--set", override]
            subprocess.run(command, check=True)
        r = seed_row(folder, args.window)
        exists = " / ".join("-" if x is None else f"{100 * x:.1f}" for x in r["exists"])
        table.append(f"| {seed} | {r['before']:.1f} | {r['after']:.1f} | "
                     f"{r['after'] - r['before']:+.1f} | {r['vote_first']:.1f} / "
                     f"{r['vote_last']:.1f} | {r['plural_first']:.1f} / {r['plural_last']:.1f} | "
                     f"{r['na_first']:.1f} / {r['na_last']:.1f} | {exists} | {r['stages']} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
