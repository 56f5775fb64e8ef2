"""Shared-prefix training against one row per completion, at the shapes where answers are long.

    python bench/bench_prefix.py                        # the default sweep, 14M model
    python bench/bench_prefix.py --images 448 --new-tokens 256 --groups 8 --repeats 3

One group (a prompt with one square image, G completions of exactly T tokens) through the
training forward and backward (`models.logprobs.completion_logprobs`, loss = the sum of the
log-probs), four ways:
- shared: `shared_prefix` on, as training runs it: split where packing pays
  (`models.logprobs.shared_prefix_pays`), else one row per completion;
- split: the packed group, always (the prompt once; attention split as
  `models/split_attention.py` computes it, P^2 + G T (P + T) pairs);
- dense: the same packed sequence under one dense 4D mask ((P + G T)^2 pairs);
- per-row: `shared_prefix` off, G rows of P + T (G (P + T)^2 pairs, G (P + T) positions).
Per trained position: split and dense train P + G T positions, per-row G (P + T) (shared:
whichever it ran).
Each (shape, way) runs in its own process (a warm-up, then `--repeats` timed runs; min and
median) so its peak RSS (the process's maximum resident memory, the model and the inputs
included) is its own; the ways of one shape run one after the other.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import split_attention  # noqa: E402
from models.inputs import collate_groups, encode_prompt, special_tokens  # noqa: E402
from models.load import load_vlm  # noqa: E402
from models.logprobs import (completion_forward, completion_logprobs,  # noqa: E402
                             shared_prefix_pays)
from models.tiny import build_tiny_vlm  # noqa: E402
from toyworld.base import corpus  # noqa: E402

SIZES = {"14M": dict(hidden_size=384, layers=8, heads=6, kv_heads=2, vision_hidden=224,
                     vision_depth=4)}
WAYS = ("shared", "split", "dense", "per-row")


def one_case(model_dir, way, side, new_tokens, group, repeats, threads):
    """Time `way` on one group; returns seconds per run, prompt tokens and peak RSS (GiB)."""
    torch.set_num_threads(threads)
    model, processor = load_vlm(model_dir)
    model.train()
    tokens = special_tokens(processor, model)
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    prompt = encode_prompt(processor, Image.fromarray(pixels),
                           "How many red squares are there in the picture? Think step by step.")
    generator = torch.Generator().manual_seed(new_tokens)
    ids = torch.randint(20, 300, (group, new_tokens), generator=generator)
    mask = torch.ones(group, new_tokens)
    rows = [prompt] * group
    if way == "split":
        split_attention.install(model)
    packed = way in ("split", "dense") or (way == "shared" and shared_prefix_pays(rows, new_tokens,
                                                                                  "split"))

    def run():
        model.zero_grad(set_to_none=True)
        if way in ("split", "dense"):
            batch, gather = collate_groups(model, rows, tokens, ids, mask, split=way == "split")
            logprobs, _ = completion_forward(model, batch, ids, temperature=1.0,
                                             banned_ids=tokens.banned_ids, chunk_size=256,
                                             with_entropy=False, gather=gather)
        else:
            logprobs, _ = completion_logprobs(model, rows, ids, mask, tokens=tokens,
                                              shared_prefix=way == "shared")
        logprobs.sum().backward()

    run()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "prompt_tokens": len(prompt.input_ids), "peak_gib": peak,
            "packed": packed}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="112,448,1008", help="square image sides, pixels")
    parser.add_argument("--new-tokens", default="32,256,512,1024")
    parser.add_argument("--groups", default="8", help="G values")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one (shape, way) as JSON
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(one_case(**case)))
        return
    ways = args.ways.split(",")
    if not set(ways) <= set(WAYS):
        parser.error(f"--ways: each of {', '.join(WAYS)}")
    print(f"bench_prefix: torch {torch.__version__}, {args.threads} threads, 14M tiny Qwen2.5-VL "
          f"(fp32), one group, forward + backward, {args.repeats} timed runs after a warm-up; "
          f"1-min load before {os.getloadavg()[0]:.2f}\n", flush=True)
    print("| image px | prompt P | new T | G | way | seconds (min / median) | ms per trained "
          "position (min) | per-row / this (min) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for side in map(int, args.images.split(",")):
            model_dir = os.path.join(tmp, f"model{side}")
            build_tiny_vlm(model_dir, corpus(0), seed=0, min_pixels=28 * 28,
                           max_pixels=side * side, **SIZES["14M"])
            for new_tokens in map(int, args.new_tokens.split(",")):
                for group in map(int, args.groups.split(",")):
                    results = {}
                    for way in ways:
                        case = dict(model_dir=model_dir, way=way, side=side,
                                    new_tokens=new_tokens, group=group, repeats=args.repeats,
                                    threads=args.threads)
                        out = subprocess.run([sys.executable, __file__, "--case",
                                              json.dumps(case)], capture_output=True, text=True)
                        if out.returncode:
                            print(f"| {side} | - | {new_tokens} | {group} | {way} | failed: "
                                  f"{out.stderr.strip().splitlines()[-1]} | | | |", flush=True)
                            continue
                        results[way] = json.loads(out.stdout.strip().splitlines()[-1])
                    for way, r in results.items():
                        p = r["prompt_tokens"]
                        positions = p + group * new_tokens if r["packed"] else (
                            group * (p + new_tokens))
                        best = min(r["seconds"])
                        ratio = (f"{min(results['per-row']['seconds']) / best:.2f}x"
                                 if "per-row" in results else "-")
                        name = f"{way} ({'split' if r['packed'] else 'per-row'})" if (
                            way == "shared") else way
                        print(f"| {side} | {p} | {new_tokens} | {group} | {name} | {best:.2f} / "
                              f"{statistics.median(r['seconds']):.2f} | "
                              f"{1000 * best / positions:.3f} | {ratio} | {r['peak_gib']:.2f} |",
                              flush=True)
    print(f"\n1-min load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
