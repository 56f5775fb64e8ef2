"""Rollout cost: the shared-prefix sampler against prefilling every sample, and against HF generate.

GRPO samples G completions per (image, prompt). `sampler.sample` prefills each prompt once and
copies its KV cache to the G rows; the alternatives prefill the image and prompt G times. The gap
grows with the number of image tokens, which is why real images (500-5000 tokens) make it matter.

    python bench/bench_sampler.py                  # CPU defaults: prints a markdown table
    python bench/bench_sampler.py --device cuda --hidden 1024 --layers 8 --image 896

Models are random (built from a config, no download); every method decodes exactly `--new-tokens`
tokens (EOS is disabled) so they do the same amount of decoding work.
"""

import argparse
import os
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.inputs import Tokens, collate, encode_prompt, special_tokens  # noqa: E402
from models.tiny import build_tiny_vlm  # noqa: E402
from sampler import Sampling, sample  # noqa: E402


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--images", default="112,224,448",
                        help="square image sides in pixels (multiples of 28)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    corpus = ["How many red circles are there? Think step by step, then give the final answer in "
              "\\boxed{}."] * 10
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_tiny_vlm(os.path.join(tmp, "m"), corpus, vocab_size=400,
                                          max_pixels=2048 * 2048, hidden_size=args.hidden,
                                          layers=args.layers, heads=4, kv_heads=2,
                                          vision_hidden=args.hidden // 2)
    model = model.to(args.device).eval()
    base = special_tokens(processor, model)
    # no EOS: every method decodes the same number of tokens
    tokens = Tokens(base.pad_id, [-1], base.banned_ids, base.image_token_id)
    sampling = Sampling(1.0, 1.0, 0, args.new_tokens)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: hidden {args.hidden}, {args.layers} layers, {parameters:.1f}M params, device "
          f"{args.device}; {args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens\n")
    print("| image | image tokens | shared prefix (s) | prefill per sample (s) | HF generate (s) "
          "| speed-up vs per-sample |")
    print("|---|---|---|---|---|---|")
    for side in map(int, args.images.split(",")):
        image = Image.new("RGB", (side, side), (200, 30, 30))
        prompts = [encode_prompt(processor, image, corpus[0]) for _ in range(args.prompts)]
        image_tokens = int(prompts[0].image_grid_thw.prod()) // 4
        generator = torch.Generator(args.device).manual_seed(0)

        def shared():
            sample(model, prompts, group_size=args.group, sampling=sampling, tokens=tokens,
                   generator=generator)

        def per_sample():
            sample(model, [p for p in prompts for _ in range(args.group)], group_size=1,
                   sampling=sampling, tokens=tokens, generator=generator)

        def hf_generate():
            batch = collate(model, prompts, tokens)
            batch.pop("position_ids")
            model.generate(**batch,
                           mm_token_type_ids=(batch["input_ids"] == tokens.image_token_id).int(),
                           do_sample=True, num_return_sequences=args.group,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           pad_token_id=tokens.pad_id,
                           bad_words_ids=[[i] for i in tokens.banned_ids])

        times = [min(timed(fn, args.device) for _ in range(args.repeats))
                 for fn in (shared, per_sample, hf_generate)]
        print(f"| {side}x{side} | {image_tokens} | {times[0]:.2f} | {times[1]:.2f} "
              f"| {times[2]:.2f} | "
              f"{times[1] / times[0]:.1f}x |")


if __name__ == "__main__":
    main()
