"""The embedded default's measured claim: held-out accuracy of the reasoner after T iterations vs
the base, over several seeds, with ablations and the oracle. Everything runs through `visplay.py`
as a user would (the oracle through `python -m toyworld.oracle`).

    python -m toyworld.claim                      # seeds 0 1 2, every setting
    python -m toyworld.claim --seeds 0 --settings full oracle
    python -m toyworld.claim --set data.toy_language=compositional --out runs/claim_compositional

Settings (each on the same seeds, so on the same base, pool and benchmark per seed):
    full           config.yaml as it is
    no_questioner  the questioner is never trained (questioner.steps=0): the base writes them all
    no_diversity   no BLEU-cluster penalty (questioner.diversity_weight=0)
    no_filter      every voted question is kept (labeling.p_low=0, labeling.p_high=1,
                   labeling.p_low_yes_no=null)
    paper_filter   the paper's filter: the band [0.3, 0.8] for every answer, yes/no ones included
                   (labeling.p_low=0.3, labeling.p_high=0.8, labeling.p_low_yes_no=null)
    oracle         the reasoner stage on the pool's questions with their TRUE answers (the ceiling)
A seed's base is built once (by its first setting) and shared by the others through a symlink.
Prints a markdown table per setting (greedy accuracy per iteration, gain over the base per seed,
mean and spread; how often the silver labels of the kept questions were right; items flipped right
-> wrong and wrong -> right per iteration; accuracy on absent-object items: analyses with the
world's ground truth that the loop itself never reads), then the share of the oracle's gain each
setting recovers, and writes the numbers to OUT/claim.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from answers import answers_equivalent
from toyworld.world import WorldConfig, pool_scenes, true_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "full": [],
    "no_questioner": ["questioner.steps=0"],
    "no_diversity": ["questioner.diversity_weight=0"],
    "no_filter": ["labeling.p_low=0", "labeling.p_high=1", "labeling.p_low_yes_no=null"],
    "paper_filter": ["labeling.p_low=0.3", "labeling.p_high=0.8", "labeling.p_low_yes_no=null"],
    "oracle": [],  # toyworld/oracle.py: the reasoner stage on TRUE pool labels
}


def overrides(setting, extra):
    """A setting's config overrides after the command line's `extra` ones: the setting's own keys
    win (no_questioner stays untrained under --set questioner.steps=30)."""
    return list(extra) + SETTINGS[setting]


def run(out, seed, setting, extra):
    """One visplay run (resumes if it was interrupted); returns its summary rows."""
    run_dir = os.path.join(out, f"seed{seed}", setting)
    shared = os.path.join(out, f"seed{seed}", "embedded")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.isdir(shared) and not os.path.exists(os.path.join(run_dir, "embedded")):
        os.symlink(os.path.abspath(shared), os.path.join(run_dir, "embedded"))
    script = ["-m", "toyworld.oracle"] if setting == "oracle" else [
        os.path.join(ROOT, "visplay.py")]
    args = [sys.executable, *script, "--config", os.path.join(ROOT, "config.yaml"),
            "--set", f"run_dir={run_dir}", "--set", f"seed={seed}"]
    for override in overrides(setting, extra):
        args += ["--set", override]
    started = time.perf_counter()
    with open(os.path.join(run_dir, "stdout.log"), "a") as log:
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if not os.path.exists(shared):  # the first setting of a seed built the world: share it
        os.replace(os.path.join(run_dir, "embedded"), shared)
        os.symlink(os.path.abspath(shared), os.path.join(run_dir, "embedded"))
    with open(os.path.join(run_dir, "summary.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    print(f"seed {seed} {setting}: {time.perf_counter() - started:.0f} s", file=sys.stderr,
          flush=True)
    return rows


def silver_accuracy(out, seed, setting, iteration):
    """Post-hoc analysis (the loop never sees it): the share of kept questions whose silver answer
    equals the true answer of its pool scene, among those whose truth the scene determines."""
    pool = pool_scenes(WorldConfig(), seed)
    path = os.path.join(out, f"seed{seed}", setting, f"kept_v{iteration}.jsonl")
    if not os.path.exists(path):
        return float("nan"), 0
    with open(path) as f:
        kept = [json.loads(line) for line in f]
    judged = [(r, true_answer(pool[r["image_index"]], r["question"])) for r in kept]
    judged = [(r, truth) for r, truth in judged if truth is not None]
    right = sum(answers_equivalent(r["silver_answer"], truth, r["choices"]) for r, truth in judged)
    return 100 * right / max(len(judged), 1), len(judged)


def accuracy(row, key="accuracy"):
    return 100 * row["eval"]["toyworld"][key]


def graded_items(out, seed, setting, iteration):
    """{item id: graded row} of one evaluation (eval_v{i}_items.jsonl)."""
    path = os.path.join(out, f"seed{seed}", setting, f"eval_v{iteration}_items.jsonl")
    with open(path) as f:
        return {row["id"]: row for row in map(json.loads, f)}


def flips_and_absent(out, seed, setting, iterations):
    """Per iteration i >= 1: (right -> wrong, wrong -> right) item counts from iteration i - 1, so
    a collapse would show; and per iteration 0..T the greedy accuracy on the absent-object items
    (`exists` questions whose answer is no: the hallucination probe)."""
    graded = [graded_items(out, seed, setting, i) for i in range(iterations)]
    flips = [(sum(before[k]["correct"] and not after[k]["correct"] for k in before),
              sum(after[k]["correct"] and not before[k]["correct"] for k in before))
             for before, after in zip(graded, graded[1:])]
    absent = []
    for items in graded:
        probe = [r for r in items.values() if r["category"] == "exists" and r["answer"] == "no"]
        absent.append(100 * sum(r["correct"] for r in probe) / max(len(probe), 1))
    return flips, absent


def table(out, setting, results):
    """Markdown rows for one setting: per seed the greedy accuracy at every iteration, the final
    gains, and the accuracy of the silver labels of the kept questions per iteration (in brackets:
    how many)."""
    iterations = len(next(iter(results.values())))
    lines = [f"### {setting}", "",
             "| seed | " + " | ".join(f"iter {i}" for i in range(iterations))
             + " | gain | pass@1 gain | maj@k gain | "
             + " | ".join(f"silver acc v{i}" for i in range(1, iterations))
             + " | flips r->w / w->r | absent-object acc |",
             "|---" * (2 * iterations + 5) + "|"]
    gains = []
    for seed, rows in results.items():
        gain = accuracy(rows[-1]) - accuracy(rows[0])
        gains.append(gain)
        sampled = [accuracy(rows[-1], k) - accuracy(rows[0], k)
                   if k in rows[0]["eval"]["toyworld"] else float("nan")
                   for k in ("pass@1", "majority@k")]
        silver = " | ".join("%.1f (%d)" % silver_accuracy(out, seed, setting, i)
                            for i in range(1, iterations))
        flips, absent = flips_and_absent(out, seed, setting, iterations)
        lines.append(f"| {seed} | " + " | ".join(f"{accuracy(r):.1f}" for r in rows) +
                     f" | {gain:+.1f} | {sampled[0]:+.1f} | {sampled[1]:+.1f} | {silver} | "
                     + ", ".join(f"{a}/{b}" for a, b in flips) + " | "
                     + " -> ".join(f"{a:.0f}" for a in absent) + " |")
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    lines += ["", f"mean gain {statistics.mean(gains):+.1f} points (std {spread:.1f}, "
                  f"min {min(gains):+.1f}, max {max(gains):+.1f}) over {len(gains)} seeds", ""]
    return "\n".join(lines), gains


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "claim"))
    parser.add_argument("--set", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()
    everything = {}
    for seed in args.seeds:
        for setting in args.settings:
            everything.setdefault(setting, {})[seed] = run(args.out, seed, setting, args.set)
    report = {}
    for setting, results in everything.items():
        text, gains = table(args.out, setting, results)
        print(text)
        report[setting] = {"gains": gains, "rows": results}
    if "oracle" in report:  # the share of the oracle's gain each setting recovers, per seed
        print("### share of the oracle's gain recovered\n")
        print("| setting | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
        print("|---" * (len(args.seeds) + 2) + "|")
        for setting, entry in report.items():
            shares = [gain / oracle if oracle > 0 else float("nan")
                      for gain, oracle in zip(entry["gains"], report["oracle"]["gains"])]
            entry["oracle_share"] = shares
            print(f"| {setting} | " + " | ".join(f"{100 * s:.0f}%" for s in shares)
                  + f" | {100 * statistics.mean(shares):.0f}% |")
    with open(os.path.join(args.out, "claim.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
