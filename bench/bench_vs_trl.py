"""One visplay GRPO step against one TRL `GRPOTrainer` step: same model, same prompts, same work.

visplay writes its own sampler and update rather than training with TRL; this measures what that
buys or costs, side by side on one machine, at settings chosen so that both sides do the same work:

- the same saved tiny Qwen2.5-VL (`tiny.build_tiny_vlm`, about 14M and 37M parameters), loaded by
  both from one folder; TRL gets `families.ImageProcessor` as its processing class
  (`AutoProcessor` cannot load it: see `models/load.py`), its tokenizer left-padding as TRL's own
  loader would set it;
- the same prompts: toy-world scenes with the reasoner's prompt (`roles`), checked on TRL's side
  (token ids, pixel values, image grids, byte for byte) before any step counts;
- P prompts x G samples x exactly N new tokens on both sides: EOS is disabled (visplay: a `Tokens`
  with no EOS id; TRL: min_new_tokens = max_new_tokens), every completion length is checked on
  every step, and a ratio is printed only when all are N on both sides;
- temperature 1, top-p 1, fp32, one AdamW update (lr 1e-6) per rollout over the whole batch as one
  micro-batch, the reasoner's reward (`rewards.reasoner_reward`), the same vision tokens banned
  from sampling, KL coefficient beta with a reference model only when beta > 0.

The visplay step is the project's own code path, as `visplay.reasoner_batch` and
`visplay.train_stage` run it: encode the prompts, `sampler.rollout`, decode, reward,
`grpo.train_step`. The TRL step is `GRPOTrainer.train()`'s own loop; a callback runs a visplay
step before TRL's first step and after each TRL step but the last, so the sides alternate and
drift of the machine hits both alike.
Two differences are design, not settings, and are what the ratio measures: visplay prefills each
prompt once for its G samples (TRL's `model.generate` gets P x G rows), and its training forwards
encode each prompt once for its G completions (`reasoner.shared_prefix`, on by default;
`--no-shared-prefix` turns it off to show the sampler's share alone). A third is design too:
with beta 0 visplay's update skips rows whose advantage is 0 (`grpo.trained_rows`; a random
model's rewards are all 0, so it trains almost nothing); `--train-every-row` trains them as TRL
does, for the same work in the update. The table gives the median share of rows trained.

Per step (the first `--warmup` steps of each side are dropped), split where each side allows:
  visplay  gen: prompt encoding, `sampler.rollout`, decode; score: reward and `grpo.score_rollout`
           (reference log-probs; old log-probs are the update forward's own at one update per
           rollout); update: the rest of `grpo.train_step` (`grpo.grpo_update`: forward,
           backward, clip, AdamW).
  TRL      gen: `GRPOTrainer._generate` (prompt templating and image processing, `model.generate`,
           decode); score: the rest of `_generate_and_score_completions` (images processed again,
           reference log-probs, reward, advantages; TRL skips old log-probs at these settings
           too); update: the rest of the step (batch fetch, forward, backward, clip, AdamW,
           scheduler, callbacks).

    python bench/bench_vs_trl.py                       # 14M and 37M, G 4 and 8, beta 0, 0.04
    python bench/bench_vs_trl.py --sizes 14M --groups 4 --betas 0 --steps 5
    python bench/bench_vs_trl.py --sizes 14M --groups 4,8 --betas 0 --prompts 4 --image 448 \
        --new-tokens 256 --steps 5 --train-every-row   # a long setting, the same update work

The default matrix takes about 10.5 minutes on 2 quiet CPU cores. Two processes of 2 threads on 2
cores stall each other far beyond their share (steps 5-10x slower), hence the load check.

TRL is not a project requirement: install `trl==1.16.0` beside the project requirements in a
separate venv. Exit status: 2 without TRL; 3 when the machine was loaded (the table is printed,
marked NOT REPORTABLE); 4 when the two sides did not do the same work.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from config import ModelConfig, ReasonerConfig  # noqa: E402
from models.families import ImageProcessor  # noqa: E402
from models.inputs import Tokens, encode_prompt, special_tokens  # noqa: E402
from models.load import load_vlm  # noqa: E402
from models.tiny import build_tiny_vlm  # noqa: E402
from rewards import reasoner_reward  # noqa: E402
from roles import reasoner_text  # noqa: E402
from sampler import Limits, Sampling, decode, rollout  # noqa: E402
from toyworld.base import corpus  # noqa: E402
from toyworld.world import (BACKGROUND, SHAPE_SCALE, WorldConfig, balanced_questions,  # noqa: E402
                            render_shapes, scenes)

# name -> `tiny.tiny_config` sizes (head_dim 64 in the text model, as Qwen's)
SIZES = {
    "14M": dict(hidden_size=384, layers=8, heads=6, kv_heads=2, vision_hidden=224, vision_depth=4),
    "37M": dict(hidden_size=512, layers=12, heads=8, kv_heads=2, vision_hidden=384,
                vision_depth=4),
}
LR = 1e-6
INSTALL = ("bench_vs_trl: TRL is not installed; in a separate venv: "
           "pip install -r requirements.txt trl==1.16.0")


class WorkMismatch(RuntimeError):
    """The two sides were not given the same prompts, or did not generate the same token count."""


@dataclass
class Item:
    """One prompt of the benchmark: a toy-world scene and a question about it."""
    image: object                 # PIL RGB image
    question: str
    answer: str                   # the exact answer (the reward's silver label)
    choices: list | None


def make_items(count, image_side, seed=0):
    """`count` scenes of the shifted toy domain (4 to 8 objects) with one question each, drawn at
    `image_side` pixels (a multiple of 4 x 28: each grid cell whole merged vision tokens)."""
    world = WorldConfig()
    scene_list = scenes(seed, count, rows=world.rows, cols=world.cols,
                        things=world.shifted_things)
    items = []
    for scene, q in balanced_questions(scene_list, seed + 1, world.families):
        objects = [(t.shape, t.color, t.row, t.col, SHAPE_SCALE[t.shape]) for t in scene.things]
        image = render_shapes(objects, rows=world.rows, cols=world.cols,
                              cell=image_side // world.cols, background=BACKGROUND)
        items.append(Item(image, q.question, q.answer, q.choices))
    return items


def build_model(path, sizes, image_side):
    """Save a randomly initialised tiny Qwen2.5-VL to `path`; returns its parameter count."""
    model, _ = build_tiny_vlm(path, corpus(0), seed=0, min_pixels=28 * 28,
                              max_pixels=image_side * image_side, **sizes)
    return sum(p.numel() for p in model.parameters())


@contextmanager
def timed_function(module, name):
    """Wrap `module.name` with a wall clock for the duration; yields [seconds summed over calls].
    Callers that look the name up in `module` at call time (as `grpo.train_step` does) are timed
    without a line of theirs changing."""
    original = getattr(module, name)
    seconds = [0.0]

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    setattr(module, name, wrapper)
    try:
        yield seconds
    finally:
        setattr(module, name, original)


# ----------------------------------------------------------------------------
# visplay's side


@contextmanager
def every_row():
    """visplay's update trains every row, as TRL's does, rows whose advantage is 0 included (with
    beta 0 it skips them: `grpo.trained_rows`)."""
    real = grpo.trained_rows
    grpo.trained_rows = lambda advantages, cfg: torch.ones_like(advantages, dtype=torch.bool)
    try:
        yield
    finally:
        grpo.trained_rows = real


class VisplaySide:
    """A reasoner GRPO stage's state for one setting (`visplay.train_stage`: policy, frozen
    reference when the KL coefficient is > 0, AdamW, tokens: `run.Run.open_stage`), and its step."""

    def __init__(self, path, items, *, group, beta, new_tokens, shared_prefix=True, seed=0,
                 train_every_row=False):
        self.items, self.train_every_row = items, train_every_row
        self.policy, self.processor = load_vlm(path)
        self.policy.eval()  # as `run.Run.load_model` leaves it; `grpo.grpo_update` trains
        self.reference = None
        if beta > 0:
            self.reference, _ = load_vlm(path)
            self.reference.eval().requires_grad_(False)
        self.cfg = ReasonerConfig(
            prompts_per_step=len(items), group_size=group, updates_per_step=1,
            micro_batch_size=len(items) * group, rollout_batch_size=len(items), temperature=1.0,
            top_p=1.0, top_k=0, max_new_tokens=new_tokens, lr=LR, kl_coef=beta,
            loss_agg="seq-mean-token-mean", shared_prefix=shared_prefix)
        self.optimizer = grpo.make_optimizer(self.policy, self.cfg)
        base = special_tokens(self.processor, self.policy)
        # No EOS id: every row decodes exactly max_new_tokens, as TRL's min_new_tokens forces.
        self.tokens = Tokens(base.pad_id, [], base.banned_ids, base.image_token_id)
        model_cfg = ModelConfig()  # the default memory limits (`run.Run.limits`)
        self.limits = Limits(self.cfg.rollout_batch_size, model_cfg.kv_cache_gib,
                             model_cfg.prefill_tokens)
        self.sampling = Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.top_k,
                                 self.cfg.max_new_tokens)
        self.generator = torch.Generator().manual_seed(seed)
        self.times, self.lengths, self.rows_trained = [], [], []

    def prompts(self):
        """The step's prompts, encoded as `visplay.reasoner_batch` encodes them."""
        return [encode_prompt(self.processor, item.image, reasoner_text(item.question))
                for item in self.items]

    def step(self):
        """One GRPO step: `visplay.reasoner_batch` (prompts, rollout, decode, reward), then
        `grpo.train_step`, timed in parts."""
        cfg = self.cfg
        started = time.perf_counter()
        prompts = self.prompts()
        sampled = rollout(self.policy, prompts, group_size=cfg.group_size, sampling=self.sampling,
                          tokens=self.tokens, limits=self.limits, generator=self.generator)
        texts = decode(self.processor, sampled.completion_ids, sampled.completion_mask)
        generated = time.perf_counter()
        rewards = torch.tensor([
            reasoner_reward(text, self.items[p].answer, self.items[p].choices,
                            accuracy_weight=cfg.accuracy_weight, format_weight=cfg.format_weight)
            for text, p in zip(texts, sampled.prompt_index.tolist())])
        rewarded = time.perf_counter()
        learner = grpo.Learner(self.policy, self.optimizer, self.reference, self.tokens)
        with timed_function(grpo, "score_rollout") as scoring, (
                every_row() if self.train_every_row else nullcontext()):
            metrics = grpo.train_step(learner, grpo.RolloutBatch(prompts, sampled, rewards), cfg)
        done = time.perf_counter()
        self.rows_trained.append(metrics["rows_trained"])
        self.lengths.append(sampled.completion_mask.sum(-1).long().tolist())
        self.times.append({"total": done - started, "gen": generated - started,
                           "score": rewarded - generated + scoring[0],
                           "update": done - rewarded - scoring[0]})


# ----------------------------------------------------------------------------
# TRL's side


def trl_settings(*, rows, group, beta, new_tokens, steps, banned_ids, output_dir):
    """GRPOConfig keyword arguments that match `VisplaySide`'s settings (see the module docstring
    and `settings_notes` for what cannot be matched exactly)."""
    return dict(
        output_dir=output_dir, report_to="none", logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        dataloader_num_workers=0, bf16=False, fp16=False, activation_checkpointing=False,
        use_vllm=False, seed=0, max_steps=steps, shuffle_dataset=False,
        # one generation batch = one optimizer step = one micro-batch of every row
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=1, num_generations=group,
        # sampling: exactly new_tokens tokens, the vision tokens banned as visplay bans them
        max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": new_tokens, "suppress_tokens": list(banned_ids)},
        # loss: per-sequence token mean, then the mean over sequences (visplay's
        # seq-mean-token-mean); clip 0.2 / 0.3; k3 KL without TRL's importance-weight correction
        loss_type="grpo", scale_rewards="group", epsilon=0.2, epsilon_high=0.3, beta=beta,
        use_bias_correction_kl=False,
        # optimizer: AdamW, constant lr, grad-norm clip 1
        optim="adamw_torch", learning_rate=LR, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        log_completions=False, log_multimodal=False,
    )


def settings_notes():
    """What the TRL side cannot match exactly (printed under the table)."""
    return [
        "TRL weight decay skips biases and norms (HF Trainer's grouping); visplay decays all "
        "weights (0.01 both).",
        "visplay has dual clip 3 on negative advantages; TRL's loss_type 'grpo' has none (it "
        "cannot bind at one update per rollout: the ratio is 1).",
        "advantages: visplay (r - mean) / (std + 1e-6), TRL (r - mean) / (std + 1e-4).",
        "TRL masks no token out of its training log-softmax; visplay masks the vision tokens "
        "when scoring as when sampling (same cost).",
        "design, not settings: TRL prefills every sample's prompt (P x G rows in model.generate) "
        "and its training forwards encode every row's prompt; visplay prefills each prompt once "
        "and copies its KV cache to its G samples, and (shared_prefix) its training forwards "
        "encode each prompt once for its G completions.",
    ]


def run_trl(path, items, *, group, beta, new_tokens, steps, banned_ids, output_dir, threads,
            between_steps):
    """Train TRL's GRPOTrainer for `steps` steps on `items`, calling `between_steps()` before
    the first step and after each step but the last. Returns (times, lengths, first_call):
    per-step seconds (total, gen, score, update), per-step completion lengths (TRL's logged
    min and max and the generated rows'), and what the first generation received."""
    from datasets import Dataset
    from transformers import PrinterCallback, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with wall clocks on `_generate` and `_generate_and_score_completions`,
        and a record of every generation's inputs and completion lengths."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seconds = {"gen": 0.0, "gen_score": 0.0}
            self.calls = []

        def _generate(self, prompts):
            start = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self.seconds["gen"] += time.perf_counter() - start

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.seconds["gen_score"] += time.perf_counter() - start

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  *args, **kwargs):
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)
            self.calls.append({"prompt_ids": [list(map(int, ids)) for ids in prompt_ids],
                               "fields": multimodal_fields,
                               "lengths": [len(ids) for ids in completion_ids]})
            return completion_ids, logprobs

    class Alternate(TrainerCallback):
        """Times each TRL step as the wall time between two visplay steps, and runs those."""

        def __init__(self):
            self.trainer, self.mark, self.times, self.lengths = None, 0.0, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            between_steps()
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.mark
            trainer, metrics = self.trainer, self.trainer._metrics["train"]
            seconds = dict(trainer.seconds)
            trainer.seconds = {"gen": 0.0, "gen_score": 0.0}
            self.times.append({"total": total, "gen": seconds["gen"],
                               "score": seconds["gen_score"] - seconds["gen"],
                               "update": total - seconds["gen_score"]})
            self.lengths.append({"logged_min": metrics["completions/min_length"][-1],
                                 "logged_max": metrics["completions/max_length"][-1],
                                 "rows": trainer.calls[-1]["lengths"]})
            if torch.get_num_threads() != threads:
                raise RuntimeError(f"torch threads changed to {torch.get_num_threads()}")
            if state.global_step < steps:
                between_steps()
            self.mark = time.perf_counter()

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    processor = ImageProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"  # what TRL's own processor loading sets

    def reasoner(completions, silver_answer, choices, **kwargs):
        return [reasoner_reward(c[0]["content"], s, ch) for c, s, ch in
                zip(completions, silver_answer, choices)]

    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": reasoner_text(item.question)}] for item in items],
        "image": [item.image for item in items],
        "silver_answer": [item.answer for item in items],
        "choices": [item.choices for item in items]})
    config = GRPOConfig(**trl_settings(rows=len(items) * group, group=group, beta=beta,
                                       new_tokens=new_tokens, steps=steps, banned_ids=banned_ids,
                                       output_dir=output_dir))
    callback = Alternate()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[reasoner], args=config,
                               train_dataset=dataset, processing_class=processor,
                               callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line, not ours
    callback.trainer = trainer
    trainer.train()
    return callback.times, callback.lengths, trainer.calls[0]


def check_same_prompts(first_call, prompts, group):
    """Raise WorkMismatch unless TRL's first generation got visplay's prompts: the same token ids,
    pixel values and image grids, each prompt repeated G times in order."""
    fields = first_call["fields"]
    pixels = torch.as_tensor(np.asarray(fields["pixel_values"]))
    grids = torch.as_tensor(np.asarray(fields["image_grid_thw"])).reshape(-1, 3)
    if len(first_call["prompt_ids"]) != len(prompts) * group:
        raise WorkMismatch(f"TRL generated for {len(first_call['prompt_ids'])} rows, "
                           f"visplay for {len(prompts) * group}")
    start = 0
    for row, ids in enumerate(first_call["prompt_ids"]):
        prompt = prompts[row // group]
        patches = int(prompt.image_grid_thw.prod())
        same = (ids == prompt.input_ids.tolist()
                and torch.equal(grids[row], prompt.image_grid_thw[0])
                and torch.equal(pixels[start:start + patches], prompt.pixel_values))
        if not same:
            raise WorkMismatch(f"row {row}: TRL's prompt (ids, pixels or grid) differs from "
                               f"visplay's prompt {row // group}")
        start += patches


def compare(path, items, *, group, beta, new_tokens, steps, warmup, threads, output_dir,
            shared_prefix=True, train_every_row=False):
    """Both sides for one setting, steps alternating. Returns a dict: per-side timed steps
    (warm-up dropped), whether the work matched and why not."""
    side = VisplaySide(path, items, group=group, beta=beta, new_tokens=new_tokens,
                       shared_prefix=shared_prefix, train_every_row=train_every_row)
    trl_times, trl_lengths, first_call = run_trl(
        path, items, group=group, beta=beta, new_tokens=new_tokens, steps=warmup + steps,
        banned_ids=side.tokens.banned_ids, output_dir=output_dir, threads=threads,
        between_steps=side.step)
    check_same_prompts(first_call, side.prompts(), group)
    rows = len(items) * group
    problems = []
    for step, lengths in enumerate(side.lengths):
        if len(lengths) != rows or set(lengths) != {new_tokens}:
            problems.append(f"visplay step {step}: lengths {sorted(set(lengths))}")
    for step, lengths in enumerate(trl_lengths):
        if (len(lengths["rows"]) != rows or set(lengths["rows"]) != {new_tokens}
                or lengths["logged_min"] != new_tokens or lengths["logged_max"] != new_tokens):
            problems.append(f"TRL step {step}: lengths {sorted(set(lengths['rows']))}, logged "
                            f"min {lengths['logged_min']} max {lengths['logged_max']}")
    return {"visplay": side.times[warmup:], "trl": trl_times[warmup:], "problems": problems,
            "rows_trained": side.rows_trained[warmup:]}


# ----------------------------------------------------------------------------
# Report


def summary(times):
    """min and median of the total, medians of the split."""
    totals = [t["total"] for t in times]
    return {"min": min(totals), "median": statistics.median(totals),
            **{part: statistics.median(t[part] for t in times) for part in ("gen", "score",
                                                                          "update")}}


def table_row(size, params, group, beta, result):
    ours, theirs = summary(result["visplay"]), summary(result["trl"])
    ratio = (f"{theirs['min'] / ours['min']:.2f}x" if not result["problems"]
             else "refused: work differs")
    return (f"| {size} ({params / 1e6:.1f}M) | {group} | {beta:g} "
            f"| {ours['min']:.2f} / {ours['median']:.2f} | {theirs['min']:.2f} / "
            f"{theirs['median']:.2f} | {ratio} "
            f"| {ours['gen']:.2f} / {ours['score']:.2f} / {ours['update']:.2f} "
            f"| {theirs['gen']:.2f} / {theirs['score']:.2f} / {theirs['update']:.2f} "
            f"| {statistics.median(result['rows_trained']):.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="14M,37M", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--groups", default="4,8", help="G values")
    parser.add_argument("--betas", default="0,0.04", help="KL coefficients")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image", type=int, default=112,
                        help="square image side in pixels, a multiple of 112 (16 merged vision "
                             "tokens at 112)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (>= 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per side")
    parser.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                        help="visplay's training forwards encode every row's prompt, as TRL's do "
                             "(reasoner.shared_prefix false; the project default is true)")
    parser.add_argument("--train-every-row", action="store_true",
                        help="visplay's update trains every row as TRL's does, also rows whose "
                             "advantage is 0 (with beta 0 the project skips them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="1-minute load average above which, before the run, results are "
                             "not reportable")
    parser.add_argument("--max-load-after", type=float, default=2.5,
                        help="the same bound after the run (the benchmark's own threads count)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    try:
        import trl
    except ImportError:
        print(INSTALL)
        sys.exit(2)
    if args.steps < 5:
        parser.error("--steps must be >= 5 (a median of fewer says little)")
    if args.image % 112:
        parser.error("--image must be a multiple of 112 (4 grid cells of whole 28-px tokens)")
    sizes = [s.strip() for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; known: {', '.join(SIZES)}")
    import transformers

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()  # weight loading bars, every setting
    # TRL 1.16 calls transformers' renamed gradient-checkpointing API every step
    warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)
    items = make_items(args.prompts, args.image)
    print(f"bench_vs_trl: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}; {args.threads} threads; {args.prompts} prompts x G, "
          f"{args.new_tokens} new tokens forced, {args.image}-px images, fp32, lr {LR:g}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per side, alternating; visplay "
          f"shared_prefix {str(args.shared_prefix).lower()}; zero-advantage rows "
          f"{'trained' if args.train_every_row else 'skipped when beta is 0'}; "
          f"1-min load before {load_before:.2f}\n", flush=True)
    params = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:  # built first: the table's rows then follow each other
            params[size] = build_model(os.path.join(tmp, size), SIZES[size], args.image)
            print(f"model {size}: {params[size]:,} parameters ({SIZES[size]})")
        # Rows print as they finish, so an interrupted run keeps what it measured; progress
        # lines go to stderr.
        print("\n| model | G | beta | visplay s/step (min / median) | TRL s/step (min / median) "
              "| TRL / visplay (min) | visplay gen / score / update | TRL gen / score / update "
              "| visplay rows trained (median share) |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        problems = []
        for size in sizes:
            for group in map(int, args.groups.split(",")):
                for beta in map(float, args.betas.split(",")):
                    started = time.perf_counter()
                    result = compare(os.path.join(tmp, size), items, group=group, beta=beta,
                                     new_tokens=args.new_tokens, steps=args.steps,
                                     warmup=args.warmup, threads=args.threads,
                                     output_dir=os.path.join(tmp, "trl"),
                                     shared_prefix=args.shared_prefix,
                                     train_every_row=args.train_every_row)
                    problems += result["problems"]
                    print(table_row(size, params[size], group, beta, result), flush=True)
                    print(f"{size}, G {group}, beta {beta:g}: "
                          f"{time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f}",
                          file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    print("\nsplits are medians in seconds. Not matched exactly:")
    print("\n".join(f"- {note}" for note in settings_notes()))
    print(f"\n1-minute load average: {load_before:.2f} before, {load_after:.2f} after")
    if problems:
        print("WORK DIFFERS, no ratio printed for those rows:\n" + "\n".join(problems))
        sys.exit(4)
    if load_before > args.max_load or load_after > args.max_load_after:
        print(f"NOT REPORTABLE: machine loaded (load {load_before:.2f} before, "
              f"{load_after:.2f} after)")
        sys.exit(3)


if __name__ == "__main__":
    try:
        main()
    except WorkMismatch as error:
        print(f"WORK DIFFERS: {error}")
        sys.exit(4)
