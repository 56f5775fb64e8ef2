"""The GPU path checked by one command: five measurements on one device, a table row each.

    python bench/gpu_check.py --write GPU_CHECK.md        # one GPU: the 3B shape, about 3 min
    python bench/gpu_check.py --shape tiny --device cpu   # CPU smoke test, about 10 s

Random weights at bench/bench_real_shapes.py's shapes (cost depends on shapes, not values), the
settings of a preset (`--preset`: its model section and reasoner stage, the longest answers).
The parts, in order (`--skip NAME,...` leaves some out):

1. precision: fp32 master weights computed in bf16 (`run.Run.autocast`, as a bfloat16 run trains
   in one process) against fp32, tiny shape, the same initial weights and rollout,
   `--precision-steps` `grpo.train_step`s each: per step the loss, grad norm and KL of both; then
   how far apart the two runs' weights are (L2, relative to the weights and to the fp32 update),
   each run's update relative to the weights, the cosine of the two updates.
2. memory: peak GPU memory of one sampling batch's rollout (`sampler.rollout`, the batch the
   preset's memory limits plan) and of the GRPO step over it (`grpo.train_step`, the KL reference
   parked in CPU memory as `run.Run.open_stage` parks it), against `predict_memory`.
3. decode: tokens/s of `sampler.sample` at `--decode-prompts` x G rows against the HBM floor (each
   decode forward reads the weights it uses and every row's KV cache once), at `--hbm-gbps` and at
   the bandwidth a device-to-device copy measures.
4. prefix: one GRPO update over one group (a `--prefix-image-size` prompt + G x
   `--prefix-new-tokens`) with the stage's `shared_prefix` on, then off: seconds, peak memory.
5. fits: the whole step's measured peak (part 2's) against `--fit-gib`, and the prediction's.

Each part is guarded (an OOM or error is written in its row, the next part runs) and starts only
within `--budget-s`; timed cases run once first to warm up (kernels; the AdamW state every step
after a run's first holds). On CPU peak memory is not measured (`-`).
"""

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
import traceback
from datetime import UTC, datetime

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real_shapes as shapes  # noqa: E402

import sampler  # noqa: E402
from config import ConfigError, load_config  # noqa: E402
from grpo import Learner, RolloutBatch, make_optimizer, train_step  # noqa: E402
from models.load import checkpoint_activations  # noqa: E402
from run import Run  # noqa: E402

PARTS = ["precision", "memory", "decode", "prefix", "fits"]
TRACKS_COSINE = 0.9  # the update cosine tests/test_precision.py asks of bf16 compute
HEADER = "| part | case | measured | against | ratio | notes |\n" + "|---" * 6 + "|"
GIB = shapes.GIB


class OneProcessRun:
    """What `run.Run.autocast` and `run.Run.on_device` read of a run (its device, model.dtype),
    for models built here: a Learner gets the very contexts a run's stage gives it."""
    autocast = Run.autocast
    on_device = Run.on_device

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype


def l2_distance(a, b):
    """L2 norm of the difference of two lists of tensors, each list one flat vector (float64)."""
    return math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))


def relative_distance(a, b):
    """||a - b|| / ||b|| over lists of tensors, each list one flat vector."""
    return l2_distance(a, b) / math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))


def update_cosine(a, b, start):
    """Cosine of the updates a - start and b - start (lists of tensors, flat)."""
    dot = sum(float(((x.double() - s.double()) * (y.double() - s.double())).sum())
              for x, y, s in zip(a, b, start))
    return dot / max(l2_distance(a, start) * l2_distance(b, start), 1e-300)


def decode_floor_seconds(*, weight_bytes, kv_bytes_per_token, rows, prompt_tokens, new_tokens,
                         bytes_per_second):
    """The least time `new_tokens` decode steps of `rows` rows take at a memory bandwidth: the
    first token comes from the prefill's logits, then new_tokens - 1 forwards; forward s (from 0)
    reads the weights once and every row's cache of prompt_tokens + s + 1 positions."""
    forwards = new_tokens - 1
    positions = forwards * (prompt_tokens + 1) + forwards * (forwards - 1) // 2
    return (forwards * weight_bytes + rows * positions * kv_bytes_per_token) / bytes_per_second


def decode_weight_bytes(model, bytes_per_parameter):
    """Bytes of weights one decode forward reads: the text decoder's layers and final norm and the
    vocabulary projection (the embedding is only looked up; tied, it is read as the projection)."""
    language = model.model.language_model
    count = sum(p.numel() for p in language.parameters()) - language.embed_tokens.weight.numel()
    return (count + model.lm_head.weight.numel()) * bytes_per_parameter


def copy_bandwidth(device, nbytes, repeats=5):
    """Bytes per second of a device-to-device copy of `nbytes` (read and write both counted)."""
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    _, seconds, _ = shapes.measured(lambda: [target.copy_(source) for _ in range(repeats)],
                                    device)
    return 2 * nbytes * repeats / seconds


def _num(x):
    """Three significant digits, thousands separated, scientific below 0.001."""
    if x == 0 or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _timed(fn, device):
    """shapes.measured(fn), and the allocator's reserved peak (GiB; None on CPU)."""
    result, seconds, peak = shapes.measured(fn, device)
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    return result, seconds, peak, reserved


def _memory(peak, reserved):
    return "-" if peak is None else f"{_num(peak)} GiB (reserved {_num(reserved)})"


def _verdict(peak, budget):
    spare = budget - peak
    return f"fits, {spare:.1f} GiB to spare" if spare >= 0 else f"does not fit, {-spare:.1f} over"


class Check:
    """The settings, the device, and the shape's model (built when a part first needs it)."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:  # as a run's (on_device)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cfg = load_config(args.preset)
        self.stage = self.cfg.reasoner
        dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else torch.float32
        self.run = OneProcessRun(self.device, dtype)
        self.config = shapes.build_config(args.shape)
        self.ids = shapes.SHAPES[args.shape]["ids"]
        self.tokens = shapes.bench_tokens(self.ids)
        self.model = self.optimizer = self.step = None

    def sampling(self, new_tokens):
        return sampler.Sampling(self.stage.temperature, self.stage.top_p, self.stage.top_k,
                                new_tokens)

    def prompts(self, side, count, seed):
        return shapes.make_prompts(self.config, self.ids, side, count,
                                   torch.Generator().manual_seed(seed))

    def shape_model(self):
        if self.model is None:
            torch.manual_seed(0)
            self.model = shapes.build_model(self.config, self.device)
            if self.cfg.model.activation_checkpointing:  # as `run.Run.load_model` enables it
                checkpoint_activations(self.model)
            self.optimizer = make_optimizer(self.model, self.stage)
        return self.model

    def learner(self, reference=None):
        return Learner(self.shape_model(), self.optimizer, reference, self.tokens,
                       autocast=self.run.autocast, on_device=self.run.on_device)

    def attempt(self, fn):
        """(fn(), None), or (None, what stopped it: OOM or the error), the model's gradients and
        the allocator's free blocks dropped so that the next measurement starts clean."""
        try:
            return fn(), None
        except torch.cuda.OutOfMemoryError:
            error = "OOM"
        except Exception as exc:  # noqa: BLE001 (any failure goes in the row; the next part runs)
            traceback.print_exc()
            error = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if self.model is not None:  # outside the except blocks: the traceback is released
            self.model.zero_grad(set_to_none=True)
            self.model.eval()
        shapes.free_memory(self.device)
        return None, error


def _rewards(rows):
    return (torch.arange(rows) % 2).float()  # 0, 1, 0, 1, ...: every group's rewards vary


def part_precision(check):
    args, device, stage = check.args, check.device, check.stage
    config, ids = shapes.build_config("tiny"), shapes.SHAPES["tiny"]["ids"]
    tokens, n, new, group = shapes.bench_tokens(ids), 4, 16, stage.group_size
    cfg = dataclasses.replace(stage, prompts_per_step=n, max_new_tokens=new,
                              updates_per_step=math.gcd(n, stage.updates_per_step))
    torch.manual_seed(0)
    model = shapes.build_model(config, device)
    start = [p.detach().clone() for p in model.parameters()]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = shapes.make_prompts(config, ids, 56, n, torch.Generator().manual_seed(1))
    sampled = sampler.sample(model, prompts, group_size=group, sampling=check.sampling(new),
                             tokens=tokens, generator=torch.Generator(device).manual_seed(0))
    batch = RolloutBatch(prompts, sampled, torch.rand(n * group,
                                                      generator=torch.Generator().manual_seed(2)))
    history, after = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model.load_state_dict(initial)
        run = OneProcessRun(device, dtype)
        reference = None
        if cfg.kl_coef > 0:  # the stage's starting weights, frozen, in model.dtype
            reference = shapes.build_model(config, device, dtype=dtype)
            reference.load_state_dict(initial)
            reference.requires_grad_(False)
        learner = Learner(model, make_optimizer(model, cfg), reference, tokens,
                          autocast=run.autocast, on_device=run.on_device)
        history[dtype] = [train_step(learner, batch, cfg) for _ in range(args.precision_steps)]
        after[dtype] = [p.detach().clone() for p in model.parameters()]
    fp32, bf16 = after[torch.float32], after[torch.bfloat16]
    cosine = update_cosine(bf16, fp32, start)
    names = [f"{name} {run}" for name in ("loss", "grad norm", "KL") for run in ("fp32", "bf16")]
    lines = ["| step | " + " | ".join(names) + " |", "|---" * 7 + "|"]
    for i, pair in enumerate(zip(history[torch.float32], history[torch.bfloat16]), 1):
        cells = [f"{m[key]:.3e}" for key in ("loss", "grad_norm", "kl") for m in pair]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    of_update = l2_distance(bf16, fp32) / max(l2_distance(fp32, start), 1e-300)
    tracks = "tracks fp32" if cosine >= TRACKS_COSINE else "drifts from fp32"
    return [["1 precision: bf16 compute vs fp32",
             (f"tiny, {args.precision_steps} GRPO steps of {n} prompts x G {group} x {new} "
              f"tokens, {cfg.updates_per_step} updates each, lr {cfg.lr:g}"),
             (f"weights apart {relative_distance(bf16, fp32):.2e} (relative), {of_update:.3f} of "
              "the fp32 update"),
             (f"updates: fp32 {relative_distance(fp32, start):.2e}, bf16 "
              f"{relative_distance(bf16, start):.2e} of the weights"), f"cosine {cosine:.4f}",
             f"bf16 {tracks} (cosine >= {TRACKS_COSINE}); per step below"]], \
        "Part 1, per GRPO step:\n\n" + "\n".join(lines)


def step_plan(check):
    """The preset's sampling batch at the shape (as `sampler.rollout` plans it), its GRPO step's
    settings, and `predict_memory`'s prediction for both phases."""
    args, cfg, stage = check.args, check.cfg, check.stage
    side, new, group = args.image_size, args.new_tokens, stage.group_size
    image_tokens, prompt_tokens = shapes.prompt_layout(check.config, side)
    limits = sampler.Limits(stage.rollout_batch_size, cfg.model.kv_cache_gib,
                            cfg.model.prefill_tokens, cfg.model.decode_check_every)
    planned = len(sampler.plan_batches(
        [prompt_tokens] * stage.prompts_per_step, group_size=group, max_new_tokens=new,
        kv_bytes=sampler.kv_bytes_per_token(check.config, check.run.dtype), limits=limits)[0])
    n = min(planned, args.prompts or planned)
    prediction = shapes.predict_memory(
        check.config, n_params=shapes.count_parameters(check.config), prompts=n,
        group_size=group, prompt_tokens=prompt_tokens, new_tokens=new,
        micro_batch_size=stage.micro_batch_size,
        activation_checkpointing=cfg.model.activation_checkpointing, reference=False,
        image_tokens=image_tokens, logprob_chunk=stage.logprob_chunk,
        prefill_tokens=cfg.model.prefill_tokens)
    case = (f"{args.shape}, {n} prompts x G {group} ({planned} planned of the step's "
            f"{stage.prompts_per_step}), {prompt_tokens}-token prompts ({side} px), {new} new "
            "tokens")
    step_cfg = dataclasses.replace(stage, prompts_per_step=n, max_new_tokens=new,
                                   updates_per_step=math.gcd(n, stage.updates_per_step))
    return {"prompts": n, "limits": limits, "cfg": step_cfg, "case": case,
            "prediction": prediction}


def measure_step(check, plan, step):
    """step["rollout"], then step["update"]: (seconds, peak, reserved peak) of one sampling
    batch's rollout and of the GRPO step over it, at the preset's shapes."""
    device, stage, step_cfg = check.device, check.stage, plan["cfg"]
    n, group, new = plan["prompts"], stage.group_size, step_cfg.max_new_tokens
    model = check.shape_model()
    reference = None
    if stage.kl_coef > 0:  # bf16 weights parked in CPU memory, on the GPU while they score
        reference = shapes.build_model(check.config, device, dtype=check.run.dtype)
        reference.load_state_dict(model.state_dict())
        reference.requires_grad_(False)
        reference.to("cpu")
    prompts = check.prompts(check.args.image_size, n, seed=3)
    learner = check.learner(reference)
    generator = torch.Generator(device).manual_seed(0)

    def rollout(new_tokens):
        with check.run.autocast():  # one context per rollout, as the stage loop opens
            return sampler.rollout(model, prompts, group_size=group, tokens=check.tokens,
                                   sampling=check.sampling(new_tokens), limits=plan["limits"],
                                   generator=generator)

    warm = rollout(min(4, new))  # warm-up: kernels, and the AdamW state every later step holds
    shapes.free_memory(device)
    train_step(learner, RolloutBatch(prompts, warm, _rewards(n * group)), step_cfg)
    del warm
    shapes.free_memory(device)
    sampled, *step["rollout"] = _timed(lambda: rollout(new), device)
    shapes.free_memory(device)  # the rollout's cache blocks back, as the stage loop does
    batch = RolloutBatch(prompts, sampled, _rewards(n * group))
    _, *step["update"] = _timed(lambda: train_step(learner, batch, step_cfg), device)


def part_memory(check):
    plan, step, rows = step_plan(check), {}, []
    check.step = step, check.attempt(lambda: measure_step(check, plan, step))[1]  # for part 5
    for phase, label in (("rollout", "rollout"), ("update", "GRPO step")):
        seconds, peak, reserved = step.get(phase, (None, None, None))
        predicted, cfg = plan["prediction"][phase], plan["cfg"]
        notes = "" if seconds is None else f"{_num(seconds)} s"
        if phase == "update":
            notes += (f"; micro-batch {cfg.micro_batch_size}, {cfg.updates_per_step} updates, "
                      f"shared prefix {'on' if cfg.shared_prefix else 'off'} (the prediction "
                      "counts one row per completion)")
        measured = _memory(peak, reserved) if phase in step else check.step[1]
        rows.append([f"2 memory: {label}", plan["case"], measured,
                     f"predicted {_num(predicted)} GiB",
                     "-" if peak is None else f"{peak / predicted:.2f} of predicted", notes])
    return rows, ""


def part_decode(check):
    args, device, stage, model = check.args, check.device, check.stage, check.shape_model()
    side, n, new, group = args.image_size, args.decode_prompts, args.decode_new_tokens, \
        stage.group_size
    rows, (_, prompt_tokens) = n * group, shapes.prompt_layout(check.config, side)
    prompts = check.prompts(side, n, seed=5)
    generator = torch.Generator(device).manual_seed(0)
    prefill_tokens = check.cfg.model.prefill_tokens

    def sample(new_tokens):
        with check.run.autocast():
            sampler.sample(model, prompts, group_size=group, sampling=check.sampling(new_tokens),
                           tokens=check.tokens, generator=generator,
                           prefill_tokens=prefill_tokens,
                           check_every=check.cfg.model.decode_check_every)

    def prefill():
        with torch.no_grad(), check.run.autocast():
            sampler._prefill(model, prompts, check.tokens, prefill_tokens)  # result dropped

    sample(min(4, new))  # warm-up
    decode = []
    for _ in range(args.repeats):
        shapes.free_memory(device)
        _, prefill_s, _ = shapes.measured(prefill, device)
        _, sample_s, _ = shapes.measured(lambda: sample(new), device)
        decode.append(max(sample_s - prefill_s, 1e-9))
    seconds = min(decode)
    shapes.free_memory(device)
    bandwidth = copy_bandwidth(device, int(args.copy_gib * GIB))
    shapes.free_memory(device)
    floor = {"weight_bytes": decode_weight_bytes(model, check.run.dtype.itemsize),
             "kv_bytes_per_token": sampler.kv_bytes_per_token(check.config, check.run.dtype),
             "rows": rows, "prompt_tokens": prompt_tokens, "new_tokens": new}
    nominal_s = decode_floor_seconds(bytes_per_second=args.hbm_gbps * 1e9, **floor)
    copy_s = decode_floor_seconds(bytes_per_second=bandwidth, **floor)
    copy_row = ["3 decode: copy bandwidth", f"device-to-device copy of {args.copy_gib:g} GiB",
                f"{bandwidth / 1e9:,.0f} GB/s", f"--hbm-gbps {args.hbm_gbps:,.0f} GB/s",
                _num(bandwidth / 1e9 / args.hbm_gbps), "read + write bytes / seconds"]
    case = (f"{args.shape}, {n} prompts x G {group} = {rows} rows, {prompt_tokens}-token "
            f"prompts, {new} new tokens")
    against = (f"floor {_num(nominal_s)} s at {args.hbm_gbps:,.0f} GB/s, {_num(copy_s)} s at "
               f"{bandwidth / 1e9:,.0f} GB/s")
    notes = (f"weights {_num(floor['weight_bytes'] / 1e9)} GB per forward; min of {args.repeats},"
             " sample minus prefill")
    rate = f"{rows * new / seconds:,.0f} tok/s ({_num(seconds)} s)"
    decode_row = ["3 decode: tokens/s", case, rate, against,
                  f"{_num(nominal_s / seconds)} / {_num(copy_s / seconds)} of the floor", notes]
    return [copy_row, decode_row], ""


def part_prefix(check):
    args, device, stage, model = check.args, check.device, check.stage, check.shape_model()
    group, new, side = stage.group_size, args.prefix_new_tokens, args.prefix_image_size
    _, prompt_tokens = shapes.prompt_layout(check.config, side)
    ids = torch.randint(0, check.ids["endoftext"], (group, new),
                        generator=torch.Generator().manual_seed(8))
    ones = torch.ones(group, new, device=device)
    sampled = sampler.Rollout(torch.zeros(group, dtype=torch.long, device=device),
                              ids.to(device), ones, torch.zeros_like(ones))
    batch = RolloutBatch(check.prompts(side, 1, seed=7), sampled, _rewards(group))
    learner, cells, costs = check.learner(), {}, {}
    for shared in (True, False):
        cfg = dataclasses.replace(stage, prompts_per_step=1, updates_per_step=1, kl_coef=0.0,
                                  max_new_tokens=new, shared_prefix=shared)

        def repeats(cfg=cfg):  # the first is the warm-up
            runs = [_timed(lambda: train_step(learner, batch, cfg), device)[1:]
                    for _ in range(args.repeats + 1)]
            return min(r[0] for r in runs[1:]), max(runs[1:], key=lambda r: r[1] or 0)[1:]

        costs[shared], error = check.attempt(repeats)
        cells[shared] = error or (f"{_num(costs[shared][0])} s, peak "
                                  f"{_memory(*costs[shared][1])}")
        model.zero_grad(set_to_none=True)
        shapes.free_memory(device)
    ratio = "-"
    if costs[True] and costs[False]:
        (on_s, (on_peak, _)), (off_s, (off_peak, _)) = costs[True], costs[False]
        ratio = f"{off_s / on_s:.2f}x faster" + (
            "" if on_peak is None else f", {on_peak / off_peak:.2f} of the memory")
    case = (f"{args.shape}, one group: {prompt_tokens}-token prompt ({side} px) + G {group} x "
            f"{new} tokens, one update, micro-batch {stage.micro_batch_size}")
    return [["4 prefix: shared prefix", case, cells[True],
             f"one row per completion: {cells[False]}", ratio,
             f"min of {args.repeats} after a warm-up; kl_coef 0"],
            ["4 prefix: one row per completion", case, cells[False], "-", "-",
             "`shared_prefix: false`"]], ""


def part_fits(check):
    budget, plan = check.args.fit_gib, step_plan(check)
    if check.step is None:  # part 2 skipped: measured here
        step = {}
        check.step = step, check.attempt(lambda: measure_step(check, plan, step))[1]
    (step, error), prediction = check.step, plan["prediction"]
    predicted = max(prediction["rollout"], prediction["update"])
    measured = peak = None
    if error:  # the measurement stopped (OOM, an error)
        measured = f"{error} in the {'GRPO step' if step else 'rollout or warm-up'}"
        verdict = f"measured: {measured}"
    elif step["rollout"][1] is None:
        verdict = "measured: not on CPU"
    else:
        peak = max(step["rollout"][1], step["update"][1])
        reserved = max(step["rollout"][2], step["update"][2])
        verdict = f"measured: {_verdict(peak, budget)} (reserved: {_verdict(reserved, budget)})"
        measured = _memory(peak, reserved)
    notes = (f"{verdict}; predicted: {_verdict(predicted, budget)}; the CUDA context (about 0.5 "
             "GiB) comes on top")
    return [[f"5 fits in {budget:g} GiB", plan["case"] + ", whole step", measured or "-",
             f"{budget:g} GiB; predicted {_num(predicted)} GiB",
             "-" if peak is None else f"{peak / budget:.2f}", notes]], ""


FUNCTIONS = {"precision": part_precision, "memory": part_memory, "decode": part_decode,
             "prefix": part_prefix, "fits": part_fits}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, as the project's commands end
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", choices=sorted(shapes.SHAPES),
        help="the model of parts 2-5 (default: 3b on a GPU, else tiny)")
    add("--device", default="auto", help="auto, cpu or cuda[:i]")
    add("--preset", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "configs", "qwen2.5-vl-3b.yaml"), help="the config whose settings are used")
    add("--image-size", type=int, help="square image side, px (default 1008; tiny 56)")
    add("--new-tokens", type=int, help="part 2's new tokens (default: the preset's; tiny 16)")
    add("--prompts", type=int, help="at most this many prompts in part 2's sampling batch "
        "(default: as many as the preset plans; tiny 2)")
    add("--precision-steps", type=int, default=4, help="part 1's GRPO steps per run")
    add("--decode-prompts", type=int, default=16, help="part 3's prompts, each G rows")
    add("--decode-new-tokens", type=int, help="default 256; tiny 8")
    add("--prefix-image-size", type=int, help="default: --image-size")
    add("--prefix-new-tokens", type=int, help="default 1024; tiny 32")
    add("--repeats", type=int, default=2, help="timed runs after the warm-up")
    add("--hbm-gbps", type=float, default=4800.0,
        help="memory bandwidth of the floor, GB/s (default: the H200's 4,800)")
    add("--copy-gib", type=float, help="size of the copy that measures the bandwidth "
        "(default 4 GiB on a GPU, 1/16 on CPU)")
    add("--fit-gib", type=float, default=80.0, help="part 5's memory budget, GiB")
    add("--budget-s", type=float, default=480.0, help="no part starts after this many seconds")
    add("--skip", default="", help=f"comma list of parts to leave out: {', '.join(PARTS)}")
    add("--write", metavar="PATH", help="also write the report to PATH (overwritten)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.device != "cpu" and not (cuda and torch.cuda.is_available()):
        parser.error(f"--device {args.device}: " + ("no CUDA device is available" if cuda else
                                                    "choose auto, cpu or cuda[:i]"))
    args.shape = args.shape or ("3b" if cuda else "tiny")
    tiny = args.shape == "tiny"
    args.skip = [name.strip() for name in args.skip.split(",") if name.strip()]
    for name in args.skip:
        if name not in PARTS:
            parser.error(f"--skip {name!r}: choose from {', '.join(PARTS)}")
    try:
        preset = load_config(args.preset)
    except ConfigError as error:
        parser.error(f"--preset: {error}")
    defaults = {"image_size": 56 if tiny else 1008, "prompts": 2 if tiny else None,
                "new_tokens": 16 if tiny else preset.reasoner.max_new_tokens,
                "decode_new_tokens": 8 if tiny else 256,
                "prefix_new_tokens": 32 if tiny else 1024, "copy_gib": 4.0 if cuda else 1 / 16}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.prefix_image_size = args.prefix_image_size or args.image_size
    for key in ("image_size", "prefix_image_size"):
        try:
            shapes.prompt_layout(shapes.build_config(args.shape), getattr(args, key))
        except ValueError as error:
            parser.error(f"--{key.replace('_', '-')}: {error}")
    for key in ("new_tokens", "prompts", "precision_steps", "decode_prompts",
                "decode_new_tokens", "prefix_new_tokens", "repeats", "hbm_gbps", "copy_gib",
                "fit_gib"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')}: must be > 0")
    return args


def report(args, *, command, device, rows, extras, seconds, total):
    """The markdown report: what ran and where, the table, each part's details, the time spent."""
    table = HEADER + "\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows)
    spent = ", ".join(f"{name} {s:.1f}" for name, s in seconds.items())
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# GPU check: the GRPO path at real shapes (random weights)", "",
        f"- command: `{command}`", f"- device: {device}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}", f"- date: {date}",
        f"- preset: {os.path.relpath(args.preset)} (model and reasoner stage)", "", table, "",
        *[extra + "\n" for extra in extras if extra],
        f"Total {total:.1f} s of a {args.budget_s:g} s budget (seconds per part: {spent}).", ""])


def main(argv=None):
    """Run the parts; returns {part name: its rows (lists of cells)} for callers such as tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    check = Check(args)
    command = "python bench/gpu_check.py " + shlex.join(argv)
    device = shapes.device_name(check.device)
    results, rows, extras, seconds = {}, [], [], {}

    def text():
        return report(args, command=command, device=device, rows=rows, extras=extras,
                      seconds=seconds, total=time.perf_counter() - started)

    for name in [name for name in PARTS if name not in args.skip]:
        begun = time.perf_counter()
        label = f"{PARTS.index(name) + 1} {name}"
        if begun - started > args.budget_s:
            found, error = None, "not run: budget spent"
        else:
            found, error = check.attempt(lambda name=name: FUNCTIONS[name](check))
        part_rows, extra = found or ([[label, "-", error, "-", "-", "-"]], "")
        seconds[name] = time.perf_counter() - begun
        results[name], rows, extras = part_rows, rows + part_rows, extras + [extra]
        for row in part_rows:
            print(f"[{name}, {seconds[name]:.1f} s] | " + " | ".join(row) + " |",
                  file=sys.stderr, flush=True)
        if args.write:  # after every part: a run cut short keeps the rows it made
            with open(args.write, "w") as f:
                f.write(text())
    print(text().split("\n\n", 1)[1])  # all but the title
    return results


if __name__ == "__main__":
    main()
