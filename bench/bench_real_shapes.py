"""Cost of one GRPO step at real Qwen2.5-VL 3B / 7B shapes, with random weights (no download).

    python bench/bench_real_shapes.py --shape tiny --repeats 1      # CPU smoke test
    python bench/bench_real_shapes.py --shape 3b,7b --write BENCHMARKS.md   # one GPU
    python bench/bench_real_shapes.py --shape 3b --predict-only     # memory plan, no weights

Why random weights: what a step costs (time and memory) depends on the shapes (layers, widths,
vocabulary, image tokens, completion length), not on the values, so a model built from a
hand-written config measures a real checkpoint's cost without its files. Every row decodes
exactly `--new-tokens` tokens (nothing ends a row), the worst case of a rollout.

Per shape, image side (square, pixels) and completion length, the table gives:
- prefill: `sampler._prefill` alone (vision tower + prompt into the KV cache);
- decode: `sampler.sample` (prefill + decode) minus the prefill of the same repeat;
- decode tok/s: prompts x G x new tokens / decode seconds;
- GRPO step: `grpo.train_step` over the rollout: old log-probs (and reference log-probs with
  `--reference`), then one AdamW update over all prompts x G rows (`updates_per_step` 1);
- peak GPU memory of the rollout (`sample`) and of the GRPO step, each next to `predict_memory`'s
  prediction for that phase.
Times are min / median over `--repeats` runs after one warm-up run (kernels compile and the AdamW
state is created then: every measured rollout holds it, as every rollout after a run's first step
does). On GPU the policy is fp32 computed in bf16 under autocast, as the project trains; on CPU it
computes in fp32 and peak memory is not measured (the process's max RSS is printed instead);
on a CPU shared with other jobs, OMP_NUM_THREADS=1 avoids oversubscribed threads' stalls.
A configuration that runs out of GPU memory is recorded as OOM and the next one runs.
"""

import argparse
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sampler  # noqa: E402
from config import ReasonerConfig  # noqa: E402
from grpo import Learner, RolloutBatch, make_optimizer, train_step  # noqa: E402
from models.inputs import Prompt, Tokens  # noqa: E402
from models.load import checkpoint_activations  # noqa: E402

GIB = 2**30

# Qwen2.5-VL's special token ids (its tokenizer's added tokens).
QWEN_IDS = dict(endoftext=151643, im_start=151644, im_end=151645, vision_start=151652,
                vision_end=151653, vision_pad=151654, image_pad=151655, video_pad=151656)
ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31])

# Each shape: its text and vision configs, special ids, and the defaults of its sweep.
SHAPES = {
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                  tie_word_embeddings=True, rope_parameters=ROPE,
                  max_position_embeddings=128000),
        vision=VISION, ids=QWEN_IDS, image_sizes=[448, 1008, 2044], new_tokens=[256, 1024],
        prompts=8, activation_checkpointing=True),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                  tie_word_embeddings=False, rope_parameters=ROPE,
                  max_position_embeddings=128000),
        vision=VISION, ids=QWEN_IDS, image_sizes=[448, 1008, 2044], new_tokens=[256, 1024],
        prompts=8, activation_checkpointing=True),
    # A few hundred thousand parameters with the same geometry (patch 14, merge 2, GQA, mrope):
    # head_dim 16 -> 8 rotary frequencies split 2 + 3 + 3 over (t, h, w).
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                  tie_word_embeddings=False, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                   "mrope_section": [2, 3, 3]}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[1]),
        ids=dict(endoftext=990, im_start=991, im_end=992, vision_start=993, vision_end=994,
                 vision_pad=995, image_pad=996, video_pad=997),
        image_sizes=[56, 112], new_tokens=[32, 128], prompts=4, activation_checkpointing=False),
}
VISION_IDS = ("vision_start", "vision_end", "vision_pad", "image_pad", "video_pad")

# The prompt around the image: <|im_start|> + a "user\n"-like header, the image, a question,
# <|im_end|>, then the assistant header (<|im_start|> "assistant\n").
HEADER_TOKENS, QUESTION_TOKENS, ASSISTANT_TOKENS = 8, 40, 2


def build_config(shape):
    """The Qwen2.5-VL config of a shape (transformers 5 field names: rope_parameters, dtype)."""
    spec = SHAPES[shape]
    ids = spec["ids"]
    text = dict(spec["text"], bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
                pad_token_id=ids["endoftext"])
    vision = dict(spec["vision"], out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                            vision_start_token_id=ids["vision_start"],
                            vision_end_token_id=ids["vision_end"],
                            tie_word_embeddings=text["tie_word_embeddings"])


def build_model(config, device, dtype=torch.float32):
    """A randomly initialised model, built directly on `device` (no CPU copy, no files)."""
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype,
                                                                attn_implementation="sdpa")
    return model.eval()


def count_parameters(config):
    """Parameters of the model a config describes, counted on the meta device (no memory)."""
    model = build_model(config, "meta")
    return sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once


def prompt_layout(config, side):
    """(image tokens, prompt tokens) of one prompt with a square `side` x `side` image."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    if side % unit:
        raise ValueError(f"image side {side} px: must be a multiple of {unit} "
                         "(patch size x spatial merge size)")
    image_tokens = (side // unit) ** 2  # 2 x 2 patches merge into one token
    # im_start, header, vision_start, image, vision_end, question, im_end, im_start, assistant
    prompt_tokens = (1 + HEADER_TOKENS + 1 + image_tokens + 1 + QUESTION_TOKENS + 2
                     + ASSISTANT_TOKENS)
    return image_tokens, prompt_tokens


def make_prompts(config, ids, side, count, generator):
    """`count` prompts laid out as Qwen's chat template lays out a user turn with one image and
    the assistant header, with random text ids and random pixels: what a processor would produce
    for a `side` x `side` image, without a tokenizer or an image."""
    vision = config.vision_config
    grid = side // vision.patch_size  # patches per side
    image_tokens, _ = prompt_layout(config, side)
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2  # 1176 at patch 14

    def text(n):  # ordinary tokens only: every id below <|endoftext|>
        return torch.randint(0, ids["endoftext"], (n,), generator=generator)

    def special(*names):
        return torch.tensor([ids[name] for name in names])

    prompts = []
    for _ in range(count):
        input_ids = torch.cat([
            special("im_start"), text(HEADER_TOKENS), special("vision_start"),
            torch.full((image_tokens,), ids["image_pad"]), special("vision_end"),
            text(QUESTION_TOKENS), special("im_end", "im_start"), text(ASSISTANT_TOKENS)])
        pixel_values = torch.randn(grid * grid, patch_dim, generator=generator)
        prompts.append(Prompt(input_ids, pixel_values, torch.tensor([[1, grid, grid]])))
    return prompts


def bench_tokens(ids):
    """The `Tokens` of a shape's special ids: nothing ends a row (every row decodes exactly
    its new tokens), vision placeholders are never sampled."""
    return Tokens(pad_id=ids["endoftext"], eos_ids=[],
                  banned_ids=[ids[name] for name in VISION_IDS], image_token_id=ids["image_pad"])


# ----------------------------------------------------------------------------
# Memory prediction


def _block_bytes(tokens, hidden, intermediate):
    """Activations one transformer block keeps for backward, for `tokens` positions: about 16
    hidden-sized tensors (norm inputs and outputs, q / k / v before and after rope, the attention
    output, residuals) and 3 intermediate-sized ones (gate, up, their product), in bf16. A rough
    count, not a trace; it is what one checkpointed block rebuilds in backward."""
    return tokens * (hidden * 16 + intermediate * 3) * 2


def _forward_bytes(tokens, hidden, intermediate):
    """Transient memory of one block's forward without autograd (prefill): nothing is kept for a
    backward, so only a few tensors of one block are alive at once: about 4 fp32 hidden-sized
    ones (residual, norm temporaries, rope's fp32 q / k) and the MLP's gate, up and activated
    gate in bf16 (3 intermediate-sized)."""
    return tokens * (hidden * 16 + intermediate * 6)


def predict_memory(config, *, n_params, prompts, group_size, prompt_tokens, new_tokens,
                   micro_batch_size, activation_checkpointing, reference, image_tokens=0,
                   logprob_chunk=256, prefill_tokens=32768):
    """Predicted peak GPU memory (GiB) of a rollout and of a GRPO step, term by term.

    For fp32 master weights computed in bf16 under autocast (how the project trains on one GPU).
    Returns a dict: each part below and the two totals, "rollout" and "update". Parts that are
    never alive at the same instant enter a total through a max, not a sum.
    prompt_tokens: tokens of one prompt (image tokens included); image_tokens: its merged image
    tokens (each is spatial_merge_size^2 patches of the vision tower).
    """
    text, vision = config.text_config, config.vision_config
    parts = {}
    # Model state.
    parts["weights"] = n_params * 4        # fp32 master weights
    parts["gradients"] = n_params * 4      # fp32 .grad: first backward -> the step (set to None)
    parts["adamw"] = n_params * 8          # exp_avg + exp_avg_sq in fp32, kept from the 1st step
    # Autocast keeps a bf16 copy of every weight it casts until its context exits, and autograd
    # keeps them for backward: all of them at the end of a forward, in the rollout and the update.
    parts["bf16_casts"] = n_params * 2
    parts["reference"] = n_params * 2 if reference else 0  # frozen bf16 copy for the KL term

    # Rollout. KV cache in bf16 (autocast), batches as `sampler.rollout` would plan them.
    kv_bytes = sampler.kv_bytes_per_token(config, torch.bfloat16)
    limits = sampler.Limits(max_prompts=prompts, kv_cache_gib=None, prefill_tokens=prefill_tokens)
    batches = sampler.plan_batches([prompt_tokens] * prompts, group_size=group_size,
                                   max_new_tokens=new_tokens, kv_bytes=kv_bytes, limits=limits)
    batch = max(len(b) for b in batches)
    # End of decode: every row's cache at full length (the largest cache of the rollout).
    parts["kv_cache"] = batch * group_size * (prompt_tokens + new_tokens) * kv_bytes
    # Prefill: the prompts' cache, plus one forward's transient activations. `_prefill` runs
    # prefill_tokens // prompt_tokens prompts per forward; the vision tower sees all their patches.
    rows = min(batch, max(1, prefill_tokens // prompt_tokens))
    patches = image_tokens * vision.spatial_merge_size ** 2
    parts["prefill"] = batch * prompt_tokens * kv_bytes + max(
        _forward_bytes(rows * prompt_tokens, text.hidden_size, text.intermediate_size),
        _forward_bytes(rows * patches, vision.hidden_size, vision.intermediate_size))
    # Right after the prefill, the prompts' cache is copied to G rows each (both copies alive).
    kv_repeat = batch * (group_size + 1) * prompt_tokens * kv_bytes

    # Training activations of one micro-batch (rows of prompt + completion, each with its image).
    tokens = micro_batch_size * (prompt_tokens + new_tokens)
    mb_patches = micro_batch_size * patches
    text_block = _block_bytes(tokens, text.hidden_size, text.intermediate_size)
    vision_block = _block_bytes(mb_patches, vision.hidden_size, vision.intermediate_size)
    if activation_checkpointing:
        # Each block keeps only its input: the text residual stream is fp32 under autocast
        # (fp32 embeddings; RMSNorm's fp32 weight times its input is fp32; fp32 + bf16 is fp32),
        # the vision one bf16 (the patch embedding's conv3d runs in bf16). Backward rebuilds
        # one block at a time (text and vision blocks never at once: the larger counts).
        activations = (tokens * text.hidden_size * 4 * text.num_hidden_layers
                       + mb_patches * vision.hidden_size * 2 * vision.depth
                       + max(text_block, vision_block))
    else:
        activations = text_block * text.num_hidden_layers + vision_block * vision.depth
    # Vocabulary projection (`grpo.completion_forward`): the final hidden states (fp32) and their
    # gradient, and one chunk of logits rebuilt in backward: about three fp32 [micro_batch, chunk,
    # vocab] tensors at once (float logits, the temperature-scaled ones logsumexp keeps, their
    # gradient).
    chunk = min(logprob_chunk, new_tokens)
    activations += (tokens * text.hidden_size * 4 * 2
                    + micro_batch_size * chunk * text.vocab_size * 4 * 3)
    parts["activations"] = activations
    # optimizer.step: foreach AdamW (torch's default on GPU) makes sqrt(exp_avg_sq) for every
    # parameter at once, an fp32 temporary; activations and bf16 casts are gone by then.
    parts["optimizer_step"] = n_params * 4

    state = parts["weights"] + parts["adamw"] + parts["reference"]
    parts["rollout"] = state + parts["bf16_casts"] + max(parts["kv_cache"], parts["prefill"],
                                                         kv_repeat)
    # Summing casts and activations slightly overcounts with checkpointing (the casts are freed
    # when the forward's autocast exits, before backward rebuilds blocks): an upper estimate.
    parts["update"] = state + parts["gradients"] + max(parts["bf16_casts"] + activations,
                                                       parts["optimizer_step"])
    return {name: value / GIB for name, value in parts.items()}


PART_NAMES = ["weights", "gradients", "adamw", "bf16_casts", "reference", "kv_cache", "prefill",
              "activations", "optimizer_step", "rollout", "update"]


def prediction_table(cases):
    """Markdown table of predictions, term by term. cases: (shape, side, new tokens, dict)."""
    lines = ["| shape | image | new tokens | " + " | ".join(PART_NAMES) + " |",
             "|---|---|---|" + "---|" * len(PART_NAMES)]
    for shape, side, new_tokens, parts in cases:
        lines.append(f"| {shape} | {side}px | {new_tokens} | "
                     + " | ".join(_gib(parts[name]) for name in PART_NAMES) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn, device):
    """Run fn once: (its result, seconds, peak GiB allocated during it, None on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return result, seconds, peak


def _larger(a, b):
    """The larger of two peaks, either None (not measured)."""
    return b if a is None else a if b is None else max(a, b)


def free_memory(device):
    """Give the caching allocator's free blocks back (after an OOM, between shapes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(model, reference, optimizer, *, config, ids, side, new_tokens, args, device):
    """Measure one (image side, completion length) configuration; returns its result row."""
    image_tokens, prompt_tokens = prompt_layout(config, side)
    generator = torch.Generator().manual_seed(side * 100003 + new_tokens)
    prompts = make_prompts(config, ids, side, args.prompts, generator)
    tokens = bench_tokens(ids)
    cfg = ReasonerConfig(group_size=args.group_size, prompts_per_step=args.prompts,
                         updates_per_step=1, micro_batch_size=args.micro_batch_size,
                         max_new_tokens=new_tokens, kl_coef=0.01 if reference else 0.0,
                         shared_prefix=args.shared_prefix)
    sampling = sampler.Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=new_tokens)
    rewards = (torch.arange(args.prompts * args.group_size) % 2).float()  # varies in each group
    sample_generator = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    def prefill():
        with torch.no_grad(), autocast():
            sampler._prefill(model, prompts, tokens, args.prefill_tokens)  # result dropped

    def rollout():
        with autocast():  # one context per rollout, as the training loop opens
            return sampler.sample(model, prompts, group_size=args.group_size, sampling=sampling,
                                  tokens=tokens, generator=sample_generator,
                                  prefill_tokens=args.prefill_tokens)

    row = dict(image_tokens=image_tokens, prompt_tokens=prompt_tokens, prefill=[], decode=[],
               step=[], rollout_peak=None, update_peak=None, rollout_oom=False,
               update_oom=False, notes=[])
    for repeat in range(args.repeats + 1):  # the first is the warm-up, not recorded
        sampled, oom = None, False
        try:
            _, prefill_seconds, _ = measured(prefill, device)
            sampled, sample_seconds, rollout_peak = measured(rollout, device)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block, so the traceback's tensors are already released
            row["rollout_oom"] = True
            free_memory(device)
            break
        if repeat:
            row["prefill"].append(prefill_seconds)
            row["decode"].append(sample_seconds - prefill_seconds)
            row["rollout_peak"] = _larger(row["rollout_peak"], rollout_peak)
        if not row["update_oom"]:
            free_memory(device)  # the rollout's cache blocks back, as the training loop does
            try:
                learner = Learner(model, optimizer, reference, tokens, autocast=autocast)
                batch = RolloutBatch(prompts, sampled, rewards)
                _, step_seconds, update_peak = measured(
                    lambda: train_step(learner, batch, cfg), device)
            except torch.cuda.OutOfMemoryError:
                oom = True
            if oom:
                row["update_oom"] = True
                optimizer.state.clear()  # a half-made AdamW state would skew later rollouts
                model.zero_grad(set_to_none=True)
                model.eval()
                row["notes"].append("rollouts measured without AdamW state")
            elif repeat:
                row["step"].append(step_seconds)
                row["update_peak"] = _larger(row["update_peak"], update_peak)
        del sampled
        free_memory(device)
    return row


def _seconds(values):
    """'min / median' of a list of seconds."""
    def fmt(x):
        return f"{x:.3f}" if x < 10 else f"{x:.1f}"
    return f"{fmt(min(values))} / {fmt(statistics.median(values))}"


def _gib(x):
    """GiB to print: one decimal, three below 1 GiB (the tiny shape), 0 for an absent part."""
    return "0" if x == 0 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _memory(measured_gib, predicted_gib, oom):
    """'measured / predicted' GiB; measured is OOM, or - when not measured (CPU)."""
    left = "OOM" if oom else ("-" if measured_gib is None else _gib(measured_gib))
    return f"{left} / {_gib(predicted_gib)}"


def format_row(shape, side, new_tokens, row, prediction, args):
    """One markdown table row from run_case's result and predict_memory's prediction."""
    if row["rollout_oom"]:
        prefill = decode = rate = "OOM"
    else:
        prefill, decode = _seconds(row["prefill"]), _seconds(row["decode"])
        rows_decoded = args.prompts * args.group_size * new_tokens
        rate = f"{rows_decoded / max(statistics.median(row['decode']), 1e-9):.0f}"
    step = "OOM" if row["update_oom"] or row["rollout_oom"] else _seconds(row["step"])
    cells = [shape, f"{side}px", str(row["image_tokens"]), str(row["prompt_tokens"]),
             str(new_tokens), prefill, decode, rate, step,
             _memory(row["rollout_peak"], prediction["rollout"], row["rollout_oom"]),
             _memory(row["update_peak"], prediction["update"],
                     row["update_oom"] or row["rollout_oom"]),
             "; ".join(row["notes"])]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| shape | image | image tokens | prompt tokens | new tokens | prefill s "
                "| decode s | decode tok/s | GRPO step s | rollout GiB meas / pred "
                "| update GiB meas / pred | notes |\n" + "|---" * 12 + "|")


# ----------------------------------------------------------------------------
# Command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append",
                        help="tiny, 3b or 7b; repeat it or give a comma list "
                             "(default: 3b,7b on GPU or with --predict-only, else tiny)")
    parser.add_argument("--image-sizes", help="square image sides in px, multiples of 28, comma "
                                              "list (default: 448,1008,2044; tiny 56,112)")
    parser.add_argument("--new-tokens", help="completion lengths, comma list "
                                             "(default: 256,1024; tiny 32,128)")
    parser.add_argument("--prompts", type=int, help="prompts per batch (default 8; tiny 4)")
    parser.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--micro-batch-size", type=int, default=8,
                        help="rows per forward / backward of the update")
    parser.add_argument("--prefill-tokens", type=int, default=32768,
                        help="padded prompt tokens per prefill forward (model.prefill_tokens)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                        help="recompute each block in backward (default: on, off for tiny)")
    parser.add_argument("--reference", action="store_true",
                        help="a frozen bf16 reference and kl_coef 0.01 (default: kl_coef 0)")
    parser.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                        help="training forwards encode each prompt once for its G completions "
                             "(--no-shared-prefix: one row per completion, to compare)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs after a warm-up")
    parser.add_argument("--predict-only", action="store_true",
                        help="print the memory predictions only; no weights are built")
    parser.add_argument("--write", metavar="PATH",
                        help="also write the table, command, device and versions to PATH "
                             "(overwritten), e.g. BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    real = args.predict_only or args.device.startswith("cuda")
    shapes = ",".join(args.shape) if args.shape else ("3b,7b" if real else "tiny")
    args.shape = [s.strip() for s in shapes.split(",") if s.strip()]
    for shape in args.shape:
        if shape not in SHAPES:
            parser.error(f"--shape {shape!r}: choose from {', '.join(SHAPES)}")
    return args


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def sweep(args, shape):
    """(image sides, completion lengths, prompts, checkpointing) of one shape, defaults filled."""
    spec = SHAPES[shape]
    sides = _ints(args.image_sizes) if args.image_sizes else spec["image_sizes"]
    lengths = _ints(args.new_tokens) if args.new_tokens else spec["new_tokens"]
    checkpointing = (spec["activation_checkpointing"] if args.activation_checkpointing is None
                     else args.activation_checkpointing)
    return sides, lengths, args.prompts or spec["prompts"], checkpointing


def predictions(args, shape, config, n_params):
    """predict_memory of every case of a shape: {(side, new tokens): parts}."""
    sides, lengths, prompts, checkpointing = sweep(args, shape)
    result = {}
    for side in sides:
        image_tokens, prompt_tokens = prompt_layout(config, side)
        for new_tokens in lengths:
            result[side, new_tokens] = predict_memory(
                config, n_params=n_params, prompts=prompts, group_size=args.group_size,
                prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                micro_batch_size=args.micro_batch_size, activation_checkpointing=checkpointing,
                reference=args.reference, image_tokens=image_tokens,
                logprob_chunk=ReasonerConfig.logprob_chunk, prefill_tokens=args.prefill_tokens)
    return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None):
    """Run the benchmark; returns the table's rows (dicts) for callers such as tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    command = "python bench/bench_real_shapes.py " + shlex.join(argv)
    reference = "on (kl_coef 0.01)" if args.reference else "off"
    settings = (f"G {args.group_size}, micro-batch {args.micro_batch_size}, prefill tokens "
                f"{args.prefill_tokens}, reference {reference}, shared prefix "
                f"{'on' if args.shared_prefix else 'off'}, {args.repeats} repeats")
    lines, rows, predicted_cases = [], [], []
    for shape in args.shape:
        config = build_config(shape)
        n_params = count_parameters(config)
        plan = predictions(args, shape, config, n_params)
        predicted_cases += [(shape, side, new, parts) for (side, new), parts in plan.items()]
        if args.predict_only:
            continue
        sides, lengths, prompts, checkpointing = sweep(args, shape)
        print(f"[{shape}] {n_params / 1e6:,.1f}M parameters, {prompts} prompts x "
              f"G {args.group_size}, activation checkpointing "
              f"{'on' if checkpointing else 'off'}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        model = build_model(config, device)
        if checkpointing:
            checkpoint_activations(model)
        reference = None
        if args.reference:
            reference = build_model(config, device, dtype=torch.bfloat16)
            reference.load_state_dict(model.state_dict())
            reference.requires_grad_(False)
        optimizer = make_optimizer(model, ReasonerConfig())
        case_args = argparse.Namespace(**{**vars(args), "prompts": prompts})
        for side in sides:
            for new_tokens in lengths:
                started = time.perf_counter()
                row = run_case(model, reference, optimizer, config=config,
                               ids=SHAPES[shape]["ids"], side=side, new_tokens=new_tokens,
                               args=case_args, device=device)
                line = format_row(shape, side, new_tokens, row, plan[side, new_tokens],
                                  case_args)
                print(f"[{shape} {side}px {new_tokens} tokens] "
                      f"{time.perf_counter() - started:.1f}s: {line}", file=sys.stderr,
                      flush=True)
                lines.append(line)
                rows.append(dict(row, shape=shape, side=side, new_tokens=new_tokens,
                                 prediction=plan[side, new_tokens]))
        del model, reference, optimizer
        free_memory(device)

    parts = prediction_table(predicted_cases)
    if args.predict_only:
        print(f"Predicted peak GPU memory (GiB), {settings}:\n\n{parts}")
        return rows
    table = TABLE_HEADER + "\n" + "\n".join(lines)
    footer = []
    if device.type == "cpu":  # ru_maxrss is in KiB on Linux
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        footer.append(f"CPU run: peak GPU memory not measured; process max RSS {rss:.2f} GiB.")
    print(table + "\n" + "\n".join(footer))
    if args.write:
        write_report(args.write, command=command, device=device_name(device),
                     settings=settings, table=table, parts=parts, footer=footer)
    return rows


METHOD = """Times: min / median over the repeats, after one warm-up run. prefill: `sampler._prefill`
alone; decode: `sampler.sample` minus the prefill of the same repeat; decode tok/s: prompts x G x
new tokens / median decode seconds; GRPO step: `grpo.train_step` (old log-probs, reference
log-probs when on, one AdamW update over all rows). Every row decodes exactly `new tokens` tokens.
Memory: `torch.cuda.max_memory_allocated` during the rollout and during the GRPO step, next to
`predict_memory`'s prediction (fp32 weights, bf16 compute; see its docstring for each term).
Random weights: time and memory depend on the shapes, not on the values."""


def write_report(path, *, command, device, settings, table, parts, footer):
    """Write the benchmark's markdown report to `path` (overwritten)."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# GRPO step cost at real Qwen2.5-VL shapes (random weights)", "",
        f"- command: `{command}`", f"- device: {device}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- date: {date}", f"- settings: {settings}", "", table, "", *footer,
        *([""] if footer else []), METHOD, "",
        "## Memory prediction, term by term (GiB)", "", parts, ""])
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
