"""What Vision-Zero's embedded run shows, per seed: spy-identification accuracy and n/a rate over
training, the stage sequence, and the held-out toy benchmark before and after
(docs/vision_zero.md). Runs `python visplay.py --config configs/vision-zero.yaml` once per seed
(each in its own run directory; a finished one is reused) and prints one markdown table. With
--visplay, VisPlay's default loop (config.yaml) also runs on each seed's game base, pool and
benchmarks, in OUT/seedS/visplay, and the table adds its held-out accuracy per iteration: the two
methods side by side on one base.

    python -m vision_zero.claim --seeds 0 1 2 --out runs/vision-zero-claim --visplay

Seeds other than 0 build their own toy base (about 18 minutes on 2 cores) and game base (about
23) first.
"""

import argparse
import json
import os
import subprocess
import sys

from config import load_config
from data import read_jsonl

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


def visplay_row(folder, seed):
    """VisPlay's held-out accuracy per iteration on the seed's game base (OUT/seedS/visplay, run
    once: config.yaml with the game run's base, pool and benchmarks)."""
    embedded, run_dir = os.path.join(folder, "embedded"), os.path.join(folder, "visplay")
    config = os.path.join(ROOT, "config.yaml")
    last = load_config(config).iterations
    if not os.path.exists(os.path.join(run_dir, f"eval_v{last}.json")):
        benchmark = os.path.join(embedded, "benchmark", "benchmark.jsonl")
        pool_questions = os.path.join(embedded, "pool_questions", "benchmark.jsonl")
        subprocess.run([sys.executable, os.path.join(ROOT, "visplay.py"), "--config", config,
                        "--set", f"run_dir={run_dir}", "--set", f"seed={seed}",
                        "--set", f"model.path={os.path.join(embedded, 'game_base')}",
                        "--set", f"data.images={os.path.join(embedded, 'pool')}",
                        "--set", f"eval.benchmarks.toyworld={benchmark}",
                        "--set", f"eval.benchmarks.pool={pool_questions}"], check=True)
    scores = []
    for i in range(last + 1):
        with open(os.path.join(run_dir, f"eval_v{i}.json")) as f:
            scores.append(100 * json.load(f)["toyworld"]["accuracy"])
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/vision-zero-claim")
    parser.add_argument("--window", type=int, default=5, help="updates averaged at each end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every seed's game (repeatable)")
    parser.add_argument("--visplay", action="store_true",
                        help="also run VisPlay (config.yaml) on each seed's game base")
    args = parser.parse_args(argv)
    table = ["| seed | toyworld before | after | change | vote acc first / last "
             f"{args.window} | plurality acc first / last | n/a first / last | exists before / "
             "after | stages |", "|---" * 9 + "|"]
    if args.visplay:
        table[0] += " VisPlay on the game base, iterations 0-3 | change |"
        table[1] += "---|---|"
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
        if args.visplay:
            scores = visplay_row(folder, seed)
            table[-1] += (" " + " -> ".join(f"{x:.1f}" for x in scores)
                          + f" | {scores[-1] - scores[0]:+.1f} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
