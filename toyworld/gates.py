"""The embedded default's gates, measured on a base before the method runs (the world's true labels
are used here for diagnosis only; the loop never reads them).

    python -m toyworld.gates                    # seed 0: builds the world like a run
    python -m toyworld.gates --seed 1 --base runs/claim/seed1/embedded/base

1. Perception: the base's greedy accuracy per question family on scenes like its pretraining ones
   (few objects); wanted >= 90% in every family.
2. Premise: on questions about the unlabeled pool's scenes, greedy accuracy vs majority@8 and @16
   vs pass@8 (samples at the labeling temperature and top-p), per family and overall; wanted
   majority@8 - greedy >= +4 points overall. Majority-vote labels can only teach what the
   majority knows better than greedy decoding.
(3. Ceiling: the `oracle` setting of toyworld/claim.py: GRPO on TRUE pool labels.)

Prints two markdown tables and writes OUT/gates.json.
"""

import argparse
import os
import random
import sys
import time

from answers import answer_correct, extract_answer, majority_vote
from benchmark_files import load_benchmark
from config import load_config
from data import load_image, write_json
from eval import format_question, generate
from models.inputs import special_tokens
from models.load import load_vlm
from roles import reasoner_prompt
from sampler import Limits, Sampling
from toyworld.base import BaseConfig, build_embedded
from toyworld.world import (FAMILIES, WorldConfig, balanced_questions, pool_questions,
                            pretraining_scene, write_questions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_domain_questions(world, seed, count):
    """`count` questions about fresh scenes drawn like the pretraining scenes."""
    rng = random.Random(seed + 20)
    return balanced_questions(
        [pretraining_scene(rng, world) for _ in range(count)], seed + 21, world.families)


def answers(model, processor, items, *, samples, sampling, max_new_tokens, seed, cfg):
    """Greedy text and `samples` sampled texts per item; cfg: the config's `model` section
    (image sizes, sampling memory bounds)."""
    import torch

    prompts = [reasoner_prompt(processor, [load_image(p, cfg.min_pixels, cfg.max_pixels)
                                           for p in item.images], format_question(item))
               for item in items]
    tokens = special_tokens(processor, model)
    limits = Limits(64, cfg.kv_cache_gib, cfg.prefill_tokens)
    greedy = generate(model, processor, prompts, group_size=1, tokens=tokens, limits=limits,
                      sampling=Sampling(0.0, 1.0, 0, max_new_tokens))
    sampled = []
    if samples:
        sampled = generate(model, processor, prompts, group_size=samples, sampling=sampling,
                           tokens=tokens, limits=limits,
                           generator=torch.Generator().manual_seed(seed))
    return greedy, [sampled[i * samples:(i + 1) * samples] for i in range(len(items))]


def score(items, greedy, sampled, ks=(8, 16), lazy_after=None):
    """Per family and overall: n, greedy, and with samples majority@k for each k, pass@8 and the
    mean sampled accuracy (pass@1). With `lazy_after`, every count family is also split at it:
    the lists the pretraining annotator sometimes cut (`base.BaseConfig.lazy_share`) and the
    ones it always wrote in full."""
    rows = {}
    for item, text, texts in zip(items, greedy, sampled):
        def right(answer):
            return bool(answer_correct(answer, item.answer, item.choices, item.answer_type))

        row = {"greedy": right(extract_answer(text, item.choices))}
        if texts:
            votes = [extract_answer(t, item.choices) for t in texts]
            correct = [right(v) for v in votes]
            for k in ks:
                row[f"maj@{k}"] = right(majority_vote(votes[:k], item.choices)[0])
            row["pass@8"] = any(correct[:8])
            row["pass@1"] = sum(correct) / len(correct)
        keys = [item.category, "overall"]
        if lazy_after is not None and item.category.startswith("count"):
            keys.append(split_key(item.category, int(item.answer) > lazy_after, lazy_after))
        for key in keys:
            rows.setdefault(key, []).append(row)
    return {key: {"n": len(group), **{m: 100 * sum(r[m] for r in group) / len(group)
                                      for m in group[0]}}
            for key, group in rows.items()}


def split_key(family, cut, lazy_after):
    return f"{family}, {'more than' if cut else 'at most'} {lazy_after} things"


def table(title, scores):
    metrics = [m for m in scores["overall"] if m != "n"]
    lines = [f"### {title}", "", "| family | n | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    families = [f for f in FAMILIES if f in scores]
    for key in families + sorted(set(scores) - set(families) - {"overall"}) + ["overall"]:
        s = scores[key]
        lines.append(f"| {key} | {s['n']} | " + " | ".join(f"{s[m]:.1f}" for m in metrics) + " |")
    return "\n".join(lines)


def gates(base, out, seed, *, perception_items=400, samples=16, overrides=()):
    """Both gates of one base; returns {"perception": scores, "premise": scores, ...}.
    `overrides`: config.yaml overrides ("labeling.temperature=1.2") for the sampling."""
    cfg = load_config(os.path.join(ROOT, "config.yaml"), list(overrides))
    world = WorldConfig(language=cfg.data.toy_language)
    labeling = cfg.labeling
    model, processor = load_vlm(base)
    model.eval()
    result = {"base": base, "seed": seed, "overrides": list(overrides)}
    started = time.perf_counter()
    lazy_after = BaseConfig().lazy_after
    for name, questions, k in (("perception", base_domain_questions(world, seed, perception_items),
                                0),
                               ("premise", pool_questions(world, seed), samples)):
        items = load_benchmark(write_questions(os.path.join(out, name), questions))
        greedy, sampled = answers(model, processor, items, samples=k,
                                  sampling=Sampling(labeling.temperature, labeling.top_p, 0,
                                                    labeling.max_new_tokens),
                                  max_new_tokens=labeling.max_new_tokens, seed=seed,
                                  cfg=cfg.model)
        result[name] = score(items, greedy, sampled, lazy_after=lazy_after)
    result["seconds"] = time.perf_counter() - started
    overall = result["premise"]["overall"]
    result["premise_gap"] = overall["maj@8"] - overall["greedy"]
    perception = result["perception"]
    result["perception_min"] = min(perception[f]["greedy"] for f in world.families)
    # the same with the count families judged only where the annotator always listed every thing
    complete = [split_key(f, False, lazy_after) if f.startswith("count") else f
                for f in world.families]
    result["perception_min_complete"] = min(perception[f]["greedy"] for f in complete
                                            if f in perception)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="a base model folder; default: build the seed's world "
                        "like a run does, in OUT/embedded")
    parser.add_argument("--out", help="default: runs/gates/seed<SEED>")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config.yaml override, e.g. labeling.temperature=1.2 (repeatable)")
    args = parser.parse_args()
    out = args.out or os.path.join(ROOT, "runs", "gates", f"seed{args.seed}")
    language = load_config(os.path.join(ROOT, "config.yaml"), args.set).data.toy_language
    base = args.base or build_embedded(os.path.join(out, "embedded"), args.seed,
                                       language)["base"]
    if not os.path.isdir(base):
        sys.exit(f"error: base model folder {base!r} does not exist")
    result = gates(base, out, args.seed, samples=args.samples, overrides=args.set)
    print(table(f"Perception: greedy accuracy on base-domain scenes (seed {args.seed})",
                result["perception"]))
    print()
    print(table(f"Premise: the unlabeled pool's scenes (seed {args.seed})", result["premise"]))
    print(f"\nperception: worst family {result['perception_min']:.1f} (gate >= 90), "
          f"{result['perception_min_complete']:.1f} where every list was complete in pretraining; "
          f"premise: maj@8 - greedy = {result['premise_gap']:+.1f} points (gate >= +4)")
    write_json(os.path.join(out, "gates.json"), result)


if __name__ == "__main__":
    main()
