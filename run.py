"""A run's machinery: its directory and sources, its models on disk and in memory, its stages'
scaffolding and metrics. `visplay.py` holds the algorithm; this module what its stages need
(`checkpoint.py` what a rerun resumes from).

- `Run`: the resolved config, the run directory, the device, the image pool and the benchmarks.
  Every path the config names is checked first (`check_sources`), then the run directory
  (`check_run_dir`), before anything is written or any expensive work starts (building the
  embedded default's world, loading a model).
- `Run.load_model` / `Run.export` / `Run.autocast`: a checkpoint folder in (a policy in fp32
  master weights, a frozen model in model.dtype), sharded over ranks under torchrun (FSDP2); a
  `save_pretrained` folder out in fp32, written by rank 0, atomically; bf16 compute for an fp32
  policy in one process.
- `Run.restart_metrics` / `Run.log_metrics` / `Run.log_summaries`: metrics.jsonl, one row per GRPO
  step, the same after a resume as without one, and the logging backends (`tracking.py`).
- `Run.open_stage` / `Stage`: a GRPO stage's scaffolding, shared by VisPlay's two roles and the
  spy game: the policy, its frozen reference and optimizer loaded, the newest checkpoint resumed,
  checkpoints while it runs, the export at its end.
- `seed_for`, `draw`: the seed of every random choice, from the config's seed and where it is
  made; a seeded draw of indices.
"""

import gc
import json
import logging
import os
import re
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import yaml

import checkpoint
import distributed
from benchmark_files import load_benchmark
from config import UNREAD, Config, ConfigError, config_to_dict, first_difference
from data import ImagePool, atomic_path, list_images, load_image, read_pairs, write_jsonl
from distributed import gathered, is_sharded, load_into_shards, shard_model
from grpo import Learner, make_optimizer
from models.families import family_of, is_vision_parameter
from models.inputs import special_tokens
from models.load import check_model_dir, checkpoint_activations, load_vlm, save_vlm
from models.logprobs import FORWARD_METHODS
from sampler import Limits
from tracking import Tracker, check_backends

log = logging.getLogger("visplay")


def seed_for(seed, *parts):
    """A seed for one random choice of the run, from the config's seed and where it is made."""
    return zlib.crc32("/".join(map(str, (seed,) + parts)).encode())


def draw(seed, population, count):
    """`count` indices of range(population): shuffled passes over the population, end to end."""
    rng = np.random.default_rng(seed)
    passes = [rng.permutation(population) for _ in range(-(-count // population))]
    return np.concatenate(passes)[:count].tolist()


def free_memory():
    """Free what a finished stage left: its models sit in reference cycles (FSDP2's hooks, the
    forward methods bound to a sharded model) that reference counting never frees, and the CUDA
    caching allocator keeps freed blocks for itself until asked to return them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_sources(cfg):
    """Read what the config names, quickly, before anything is written: (image paths or None,
    {benchmark name: items}, {benchmark name: its reading report (rows skipped by reason)}).

    A model folder that cannot be loaded (no config.json, a model_type outside the family table,
    a safetensors file cut short: `models.load.check_model_dir`), a model without images or
    pairs, a missing, empty or unreadable image folder, manifest or pair manifest, a missing
    benchmark file or one without a usable row is a ConfigError naming the key.
    """
    game = cfg.method == "vision-zero"  # image pairs (spy.pairs) instead of a pool of images
    if cfg.model.path is not None:
        try:
            check_model_dir(cfg.model.path)
        except FileNotFoundError as error:
            raise ConfigError(f"model.path: {error}, or leave model.path empty for the embedded "
                              "default") from None
        except ValueError as error:
            raise ConfigError(f"model.path: {error}") from None
        if game and cfg.spy.pairs is None:
            raise ConfigError("spy.pairs: a game on model.path needs a JSONL manifest of image "
                              "pairs, one {\"original\": path, \"edited\": path} per line")
        if not game and cfg.data.images is None:
            raise ConfigError("data.images: a run on model.path needs a folder or a JSONL "
                              "manifest of images")
    pixels = cfg.model.min_pixels, cfg.model.max_pixels
    for key in ("pairs", "heldout_pairs"):
        manifest = getattr(cfg.spy, key)
        if not game or key == "heldout_pairs" and not cfg.spy.heldout_games:
            continue
        if manifest is None and key == "heldout_pairs" and cfg.model.path is not None:
            raise ConfigError("spy.heldout_pairs: held-out games on model.path need a manifest "
                              "of pairs the training never sees (or spy.heldout_games=0)")
        if manifest is not None:
            try:
                pairs = read_pairs(manifest)
                _first_readable(pairs, lambda pair: [load_image(path, *pixels) for path in pair],
                                f"pairs of {manifest}")
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(f"spy.{key}: {error}") from None
    image_paths = None
    if cfg.data.images is not None:
        try:
            image_paths = list_images(cfg.data.images)
            _first_readable(image_paths, lambda path: load_image(path, *pixels),
                            f"images of {cfg.data.images}")
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.images: {error}") from None
    benchmarks, reports = {}, {}
    for name, path in cfg.eval.benchmarks.items():
        try:
            reports[name] = {}
            benchmarks[name] = load_benchmark(path, report=reports[name])
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"eval.benchmarks.{name}: {error}") from None
    return image_paths, benchmarks, reports


def _first_readable(entries, read, what):
    """Read entries in order until one can be read (a pool of unreadable images would fail only
    at the first training step). ValueError, with the first failure, when none can."""
    first = None
    for entry in entries:
        try:
            read(entry)
            return
        except ValueError as error:
            first = first or error
    raise ValueError(f"none of the {len(entries)} {what} can be read; the first: {first}")


def check_run_dir(path):
    """Make the run directory; ConfigError unless it is a folder this process can write in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"run_dir: {path!r} is a file, not a folder: give a folder for the "
                          "run's files (it is made when missing)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_check_{uuid.uuid4().hex}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"run_dir: cannot write in {path!r} ({error.strerror}): give a folder "
                          "this user may write") from None


@dataclass
class Stage:
    """A GRPO stage under way (`Run.open_stage`): what it trains with, where it resumes from, where
    it checkpoints and where it ends."""
    run: "Run"
    learner: Learner              # the policy, its optimizer and frozen reference, the tokens
    processor: object             # the policy's processor
    steps: int                    # the stage's GRPO steps
    folder: str                   # RUN/checkpoints/<out folder name>: its resumable checkpoints
    out_path: str                 # the save_pretrained folder it ends in
    start: int = 0                # the first step to run: 0, or the resumed checkpoint's step
    extra: dict | None = None     # what the resumed checkpoint kept besides the weights, the
                                  # optimizer and the RNG states (`save`'s extra)

    def save(self, done, extra=None):
        """After `done` steps: a resumable checkpoint every save_every steps (none after the last
        step: the export follows). extra: JSON data the stage needs to resume (the spy game's
        stage switch and role baselines)."""
        every = self.run.cfg.save_every
        if every and done % every == 0 and done < self.steps:
            checkpoint.save(self.folder, done, self.learner.policy, self.learner.optimizer,
                            extra=extra)

    def finish(self):
        """Export the trained policy to out_path (`Run.export`) and remove the checkpoints."""
        self.run.export(self.learner.policy, self.processor, self.out_path)
        checkpoint.remove(self.folder)


class Run:
    """Everything a stage needs besides its own inputs. Construct on every rank."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = cfg.run_dir
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = distributed.init("cuda" if want_cuda else "cpu", cfg.timeout_minutes)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        for role in ("spy",) if cfg.method == "vision-zero" else ("questioner", "reasoner"):
            stage = getattr(cfg, role)
            if stage.prompts_per_step % (stage.updates_per_step * distributed.world_size()):
                raise ConfigError(
                    f"{role}.prompts_per_step ({stage.prompts_per_step}) must be a multiple of "
                    f"updates_per_step x processes ({stage.updates_per_step} x "
                    f"{distributed.world_size()}): every rank takes an equal share of every update")
        check_backends(cfg)  # an optional package the logging needs is missing: say so now
        if cfg.model.cpu_offload and not distributed.active():
            raise ConfigError("model.cpu_offload: works under torchrun only (FSDP2 offloads the "
                              "sharded weights); in one process turn on "
                              "model.activation_checkpointing or lower micro_batch_size instead")
        image_paths, self.benchmarks, self.benchmark_reports = check_sources(cfg)
        check_run_dir(self.dir)  # every rank: each must be able to write there
        self.base = cfg.model.path
        self.truth = None  # the embedded pool's: (image index, question) -> (family, true answer)
        if cfg.model.path is None:  # the embedded default fills in what the config leaves empty
            world = self._embedded_world()
            self.base = world["base"]
            toy_pool = image_paths is None
            if toy_pool:
                from toyworld.world import pool_truth

                image_paths = list_images(world["pool"])
                self.truth = pool_truth(cfg.seed)
            if not self.benchmarks:  # the held-out benchmark, and the pool's questions (diagnosis)
                files = {"toyworld": world["benchmark"]}
                if toy_pool:
                    files["pool"] = world["pool_questions"]
                for name, path in files.items():
                    self.benchmark_reports[name] = {}
                    self.benchmarks[name] = load_benchmark(path,
                                                           report=self.benchmark_reports[name])
        if cfg.data.max_images is not None and image_paths:
            image_paths = image_paths[:cfg.data.max_images]
        self.pool = ImagePool(image_paths or [], cfg.model.min_pixels, cfg.model.max_pixels)
        self.metrics_path = self.path("metrics.jsonl")
        self.tracker = Tracker(cfg, self.dir) if distributed.is_main() else None
        self.logged = 0  # rows in metrics.jsonl: the next row's global step
        if distributed.is_main() and os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as f:
                self.logged = sum(1 for line in f if line.strip())
        self._check_shared()

    def _embedded_world(self):
        """The toy world's base, pool and benchmark (`toyworld.base.build_embedded`), built by
        rank 0 the first time, then found by every rank."""
        from toyworld.base import build_embedded

        if os.path.isdir(self.path("embedded", "base")):
            log.info("reusing the embedded world built earlier in %s", self.path("embedded"))
        if distributed.is_main():
            world = build_embedded(self.path("embedded"), self.cfg.seed,
                                   self.cfg.data.toy_language)
        distributed.barrier()
        if not distributed.is_main():
            world = build_embedded(self.path("embedded"), self.cfg.seed,
                                   self.cfg.data.toy_language)
        return world

    def _check_shared(self):
        """Every rank must see the same run directory (several nodes: a shared filesystem): rank 0
        writes a fresh token there and every rank reads it back."""
        token = uuid.uuid4().hex if distributed.is_main() else None
        probe = self.path(".shared_check")
        if distributed.is_main():
            with open(probe, "w") as f:
                f.write(token)
        token = distributed.all_gather_list([token] if distributed.is_main() else [])[0]
        try:
            with open(probe) as f:
                seen = f.read() == token
        except FileNotFoundError:
            seen = False
        blind = distributed.all_reduce_sum(0.0 if seen else 1.0)
        distributed.barrier()
        if distributed.is_main():
            os.remove(probe)
        if blind:
            raise ConfigError(f"run_dir: {self.dir!r} is not shared by every process ({blind:.0f} "
                              "cannot see what rank 0 writes there); a run over several nodes "
                              "needs a run_dir on a filesystem every node mounts")

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def check_config(self):
        """Save the resolved config; refuse to resume a run directory made with another config.

        What may change on a rerun: how long it runs (iterations, guard.*), where and how it runs
        (run_dir, device, timeout_minutes, save_every), where its numbers go (logging.*), the
        sections its method never reads (`config.UNREAD`), a key added to config.py since the run
        began while it keeps its default, and eval.* while no evaluation was written with the old
        one. Anything else would make the finished stages disagree with config.yaml."""
        path = self.path("config.yaml")
        current = config_to_dict(self.cfg)
        if os.path.exists(path):
            with open(path) as f:
                previous = yaml.safe_load(f) or {}
            free = ("iterations", "run_dir", "device", "timeout_minutes", "save_every", "eval",
                    "logging", "guard") + UNREAD[self.cfg.method]
            changed = first_difference({k: v for k, v in previous.items() if k not in free},
                                       {k: v for k, v in current.items() if k not in free},
                                       defaults=config_to_dict(Config()))
            if changed is not None:
                key, old, new = changed
                raise ConfigError(
                    f"{key}: run_dir {self.dir!r} holds a run made with {key} = {old!r}, this "
                    f"config has {new!r}; use another run_dir (--set run_dir=...) or delete that "
                    "folder to start over")
            changed = first_difference({"eval": previous.get("eval")},
                                       {"eval": current["eval"]})
            evaluated = sorted(name for name in os.listdir(self.dir)
                               if re.fullmatch(r"eval_v\d+\.json", name))
            if changed is not None and evaluated:
                key, old, new = changed
                raise ConfigError(
                    f"{key}: {', '.join(evaluated)} in {self.dir!r} were made with {key} = "
                    f"{old!r}, this config has {new!r}; evaluate the checkpoints with eval.py, "
                    "or use another run_dir")
        if distributed.is_main():
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                yaml.safe_dump(current, f, sort_keys=False)

    def limits(self, max_prompts):
        """The sampling `Limits` of a stage: at most `max_prompts` prompts per batch, and the
        config's memory bounds (model.kv_cache_gib, model.prefill_tokens) and
        model.decode_check_every."""
        model = self.cfg.model
        return Limits(max_prompts, model.kv_cache_gib, model.prefill_tokens,
                      model.decode_check_every)

    def generator(self, *parts):
        """A torch generator for one random choice; each rank draws its own stream."""
        seed = seed_for(self.cfg.seed, *parts, distributed.rank())
        return torch.Generator(self.device).manual_seed(seed)

    # ------------------------------------------------------------------ models

    def load_model(self, path, trainable, park=False):
        """A model and its processor from a folder; sharded with FSDP2 when several processes run.

        Trainable (a stage's policy): fp32 master weights whatever model.dtype says, so that an
        AdamW update of lr 1e-6 is not rounded away (half a bf16 ulp of a 0.02 weight is 6e-5).
        With model.dtype bfloat16 it computes in bf16: by FSDP2's mixed precision under torchrun,
        under `Run.autocast` in one process. Frozen (the reference, the other role, generation,
        labeling, evaluation): weights in model.dtype. Sharded, only rank 0 reads the weights
        (into CPU memory) and broadcasts them into the other ranks' shards.
        park: a frozen model of one process waits in CPU memory and comes to the GPU only inside
        `Run.in_use` / `Run.on_device` (the reference and the questioner stage's frozen reasoner,
        7 GiB each for a 3B model, are off the GPU while the policy updates).
        """
        settings = self.cfg.model
        sharded = distributed.active()
        dtype = torch.float32 if trainable else self.dtype
        device = "meta" if sharded else "cpu" if park and not trainable else self.device
        model, processor = load_vlm(path, dtype=dtype, device=device,
                                    attn_implementation=settings.attn_implementation)
        if family_of(model).pixel_limits:  # (InternVL and Gemma resize to their fixed tiles)
            processor.image_processor.size = {"shortest_edge": settings.min_pixels,
                                              "longest_edge": settings.max_pixels}
        model.eval()
        for name, param in model.named_parameters():
            frozen = settings.freeze_vision and is_vision_parameter(model, name)
            param.requires_grad_(trainable and not frozen)
        if trainable and settings.activation_checkpointing:  # recomputed in backward, per block
            checkpoint_activations(model)
        if sharded:
            shard_model(model, mixed_precision=trainable and self.dtype == torch.bfloat16,
                        cpu_offload=settings.cpu_offload, forward_methods=FORWARD_METHODS)
            full = load_vlm(path, dtype=dtype)[0] if distributed.is_main() else None
            load_into_shards(model, full, self.device)
        return model, processor

    @contextmanager
    def in_use(self, model):
        """A frozen model ready to sample with: sharded, its whole weights gathered on every rank
        (`distributed.gathered`); parked (`load_model(park=True)`), on the GPU until the end."""
        if is_sharded(model):
            with gathered(model):
                yield model
            return
        with self.on_device(model):
            yield model

    @contextmanager
    def on_device(self, model):
        """A parked model (`load_model(park=True)`) on the GPU until the end, then back in CPU
        memory; any other model as it is."""
        parked = not is_sharded(model) and next(model.parameters()).device != self.device
        if parked:
            model.to(self.device)
        try:
            yield model
        finally:
            if parked:  # its GPU blocks back to the allocator; no collection needed (no cycle)
                model.to("cpu")
                torch.cuda.empty_cache()

    def autocast(self):
        """bf16 compute for the fp32 policy in one process when model.dtype is bfloat16 (under
        torchrun FSDP2's mixed precision does it, and this is off). Matmuls run in bf16 and
        gradients land in fp32. The weights' bf16 casts are kept until the context exits, so
        one context must never span an optimizer step (`grpo.train_step` opens one per forward).
        """
        enabled = self.dtype == torch.bfloat16 and not distributed.active()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def export(self, model, processor, path):
        """`save_pretrained` folder of a trained (possibly sharded) policy, by rank 0.

        In fp32, the master weights: the next stage starts from this folder, and a bf16 export
        would round most of a stage's updates at lr 1e-6 (about 2e-5 per weight over 20 steps)
        to noise. config.json says float32; load it with dtype=bfloat16 to serve it in bf16.
        """
        state = None
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
        if distributed.is_main():
            save_vlm(model, processor, path, state_dict=state)
        distributed.barrier()

    def open_stage(self, settings, *, start_path, out_path, label):
        """A GRPO stage's pieces, for VisPlay's two roles and the spy game alike: the policy from
        start_path (trainable), its frozen reference when settings.kl_coef > 0 (the KL term's
        anchor: the stage's starting weights, parked), AdamW (`grpo.make_optimizer`); then the
        newest complete checkpoint in RUN/checkpoints/<out folder name>, if any, loaded into
        them (logged as "[label] resumed from ..."). Returns a `Stage`."""
        policy, processor = self.load_model(start_path, trainable=True)
        reference = None
        if settings.kl_coef > 0:  # on the GPU only while it scores (park)
            reference, _ = self.load_model(start_path, trainable=False, park=True)
        optimizer = make_optimizer(policy, settings)
        learner = Learner(policy, optimizer, reference, special_tokens(processor, policy),
                          autocast=self.autocast, on_device=self.on_device)
        stage = Stage(self, learner, processor, settings.steps,
                      self.path("checkpoints", os.path.basename(out_path)), out_path)
        found = checkpoint.latest(stage.folder)
        if found is not None:
            stage.start, path = found
            stage.extra = checkpoint.load(path, policy, optimizer)["extra"]
            log.info("[%s] resumed from %s", label, path)
        return stage

    # ------------------------------------------------------------------ metrics

    def restart_metrics(self, iteration, stage, from_step=0):
        """Drop the metric rows of this stage from `from_step` on (an interrupted attempt wrote
        them), and a row cut short (with a warning naming it)."""
        if distributed.is_main() and os.path.exists(self.metrics_path):
            rows = []
            with open(self.metrics_path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        rows += [json.loads(line)] if line.strip() else []
                    except json.JSONDecodeError:  # a row cut short by a power loss or full disk
                        log.warning("%s:%d: a row cut short, dropped", self.metrics_path, number)
            rows = [r for r in rows if not (r.get("iteration") == iteration
                                            and r.get("stage") == stage
                                            and r.get("step", 0) >= from_step)]
            write_jsonl(self.metrics_path, rows)
            self.logged = len(rows)

    def log_metrics(self, row):
        """Append one GRPO step's row to metrics.jsonl, and to the logging backends at its global
        step (its index in metrics.jsonl)."""
        if distributed.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log(row, self.logged)
            self.logged += 1

    def log_summaries(self, summaries):
        """The per-iteration summary rows so far, to the logging backends (`tracking.Tracker`)."""
        if distributed.is_main():
            self.tracker.log_summaries(summaries)

    def close_logging(self):
        if distributed.is_main():
            self.tracker.close()
