"""A run's machinery: its directory, devices and ranks, models on disk and in memory, resume.

`visplay.py` holds the algorithm; this module holds what every stage of it needs:
- `Run`: the resolved config, the run directory, the device, the image pool and the benchmarks;
- `Run.load` / `Run.export`: a checkpoint folder in, sharded over ranks under torchrun (FSDP2), and
  a `save_pretrained` folder out (written by rank 0, atomically);
- `Run.train`: the GRPO stage driver shared by both roles: resume from the newest complete
  checkpoint, one `grpo.train_step` per step, metrics, checkpoints every `save_every` steps;
- `Run.in_parts`: work split into chunks over ranks, each chunk's rows saved as a part file (so a
  killed stage resumes at the first missing part), merged in order by rank 0.
"""

import json
import logging
import os
import shutil
import time
import zlib

import torch
import yaml

import checkpoint
import distributed
from config import ConfigError, config_to_dict
from data import ImagePool, list_images, read_jsonl, write_jsonl
from eval import load_benchmark
from grpo import is_sharded, make_optimizer, shard_model, special_tokens, train_step
from vlm import check_model_dir, load_vlm, save_vlm

log = logging.getLogger("visplay")


def seed_for(seed, *parts):
    """A seed for one random choice of the run, derived from the config's seed and where it is made."""
    return zlib.crc32("/".join(map(str, (seed,) + parts)).encode())


class Run:
    """Everything a stage needs besides its own inputs. Construct on every rank."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = cfg.run_dir
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = distributed.init("cuda" if want_cuda else "cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        if distributed.is_main():
            os.makedirs(self.dir, exist_ok=True)
            self.base, images, benchmarks = self._sources()
        distributed.barrier()  # rank 0 has built the embedded world, if any
        if not distributed.is_main():
            self.base, images, benchmarks = self._sources()
        check_model_dir(self.base)
        paths = list_images(images)
        if cfg.data.max_images is not None:
            paths = paths[:cfg.data.max_images]
        self.pool = ImagePool(paths, cfg.model.min_pixels, cfg.model.max_pixels)
        self.benchmarks = {name: load_benchmark(path) for name, path in benchmarks.items()}
        self.metrics_path = self.path("metrics.jsonl")
        for role in ("questioner", "reasoner"):
            stage = getattr(cfg, role)
            if stage.prompts_per_step % (stage.updates_per_step * distributed.world_size()):
                raise ConfigError(f"{role}.prompts_per_step ({stage.prompts_per_step}) must be a multiple of "
                                  f"updates_per_step x processes ({stage.updates_per_step} x "
                                  f"{distributed.world_size()}): every rank takes an equal share of every update")

    def _sources(self):
        """(base model folder, image source, benchmarks): the config's, or the embedded toy world's."""
        cfg = self.cfg
        if cfg.model.path is not None:
            if cfg.data.images is None:
                raise ConfigError("data.images: a run on model.path needs a folder or manifest of images")
            return cfg.model.path, cfg.data.images, cfg.eval.benchmarks
        import toyworld
        world = toyworld.build_embedded(self.path("embedded"), cfg.seed)
        return world["base"], cfg.data.images or world["pool"], cfg.eval.benchmarks or {"toyworld": world["benchmark"]}

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def check_config(self):
        """Save the resolved config; refuse to resume a run directory made with a different config."""
        path = self.path("config.yaml")
        current = config_to_dict(self.cfg)
        if os.path.exists(path):
            with open(path) as f:
                previous = yaml.safe_load(f)
            for section in current:
                if section in ("iterations", "eval", "save_every") or previous.get(section) == current[section]:
                    continue
                raise ConfigError(f"run_dir {self.dir!r} holds a run made with a different {section!r} setting; "
                                  "use another run_dir (--set run_dir=...) or delete that folder to start over")
        if distributed.is_main():
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                yaml.safe_dump(current, f, sort_keys=False)
            os.replace(tmp, path)

    def generator(self, *parts):
        """A torch generator for one random choice; each rank draws its own stream."""
        return torch.Generator(self.device).manual_seed(seed_for(self.cfg.seed, *parts, distributed.rank()))

    # ------------------------------------------------------------------ models

    def load(self, path, trainable):
        """A model and its processor from a folder; sharded with FSDP2 when several processes run.

        Single process: weights in model.dtype. Sharded: fp32 master weights, computed in bf16 when
        model.dtype is bfloat16 (mixed precision). Every rank reads the folder (CPU memory: one copy
        of the weights per process while loading).
        """
        mcfg = self.cfg.model
        sharded = distributed.active()
        model, processor = load_vlm(path, dtype=torch.float32 if sharded else self.dtype,
                                    device="cpu" if sharded else self.device,
                                    attn_implementation=mcfg.attn_implementation)
        processor.image_processor.size = {"shortest_edge": mcfg.min_pixels, "longest_edge": mcfg.max_pixels}
        model.eval()
        for name, param in model.named_parameters():
            param.requires_grad_(trainable and not (mcfg.freeze_vision and ".visual." in f".{name}"))
        if sharded:
            model.to(self.device)
            shard_model(model, mixed_precision=self.dtype == torch.bfloat16, cpu_offload=mcfg.cpu_offload,
                        activation_checkpointing=trainable and mcfg.activation_checkpointing)
        return model, processor

    def export(self, model, processor, path):
        """`save_pretrained` folder of a (possibly sharded) model, in model.dtype, written by rank 0."""
        state = None
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            state = {name: tensor.to(self.dtype) for name, tensor in full.items()}
        if distributed.is_main():
            save_vlm(model, processor, path, state_dict=state)
        distributed.barrier()

    # ------------------------------------------------------------------ metrics

    def restart_metrics(self, iteration, stage, from_step=0):
        """Drop the metric rows of this stage from `from_step` on (an interrupted attempt wrote them)."""
        if distributed.is_main() and os.path.exists(self.metrics_path):
            rows = [r for r in read_jsonl(self.metrics_path) if not (
                r.get("iteration") == iteration and r.get("stage") == stage and r.get("step", 0) >= from_step)]
            write_jsonl(self.metrics_path, rows)

    def log_metrics(self, row):
        if distributed.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ stage drivers

    def train(self, role, iteration, start_path, out_path, make_batch):
        """GRPO stage of `role` ("questioner" | "reasoner"): from start_path's weights to out_path.

        make_batch(policy, processor, tokens, step) -> (prompts, rollout, rewards, extra metrics)
        samples and scores this rank's share of step `step`. The reference for the KL term is the
        stage's starting weights. Resumes from RUN/checkpoints/<stage>/ when a checkpoint exists.
        """
        cfg = getattr(self.cfg, role)
        policy, processor = self.load(start_path, trainable=True)
        reference = self.load(start_path, trainable=False)[0] if cfg.kl_coef > 0 else None
        optimizer = make_optimizer(policy, cfg)
        tokens = special_tokens(processor, policy)
        folder = self.path("checkpoints", os.path.basename(out_path))
        start = 0
        found = checkpoint.latest(folder)
        if found is not None:
            start, path = found
            checkpoint.load(path, policy, optimizer)
            log.info("[iter %d %s] resumed from %s", iteration, role, path)
        self.restart_metrics(iteration, role, from_step=start)
        for step in range(start, cfg.steps):
            prompts, result, rewards, extra = make_batch(policy, processor, tokens, step)
            metrics = train_step(policy, reference, optimizer, prompts, result, rewards, tokens, cfg)
            metrics.update(extra, iteration=iteration, stage=role, step=step)
            self.log_metrics(metrics)
            log.info("[iter %d %s %d/%d] reward %.3f±%.3f  kl %.4f  entropy %.2f  len %.1f  grad %.3f  time "
                     "sample %.1fs score %.1fs train %.1fs", iteration, role, step + 1, cfg.steps,
                     metrics["reward_mean"], metrics["reward_std"], metrics["kl"], metrics["entropy"],
                     metrics["response_length_mean"], metrics["grad_norm"], metrics["seconds_sampling"],
                     metrics["seconds_scoring"], metrics["seconds_training"])
            if self.cfg.save_every and (step + 1) % self.cfg.save_every == 0 and step + 1 < cfg.steps:
                checkpoint.save(folder, step + 1, policy, optimizer)
        self.export(policy, processor, out_path)
        checkpoint.remove(folder)

    def in_parts(self, out_path, chunks, work):
        """Run work(chunk) -> rows for chunk = 0 .. chunks-1, split over ranks, resumable.

        Each chunk's rows go to OUT.parts/<chunk>.jsonl atomically; a rerun skips the parts that
        exist. Returns every row in chunk order on rank 0 (None on other ranks) and removes the parts
        folder once the caller has written its results (`done_parts`).
        """
        folder = out_path + ".parts"
        os.makedirs(folder, exist_ok=True)
        for chunk in range(distributed.rank(), chunks, distributed.world_size()):
            part = os.path.join(folder, f"{chunk:06d}.jsonl")
            if not os.path.exists(part):
                write_jsonl(part, work(chunk))
        distributed.barrier()
        if not distributed.is_main():
            return None
        return [row for chunk in range(chunks) for row in read_jsonl(os.path.join(folder, f"{chunk:06d}.jsonl"))]

    def done_parts(self, out_path):
        if distributed.is_main():
            shutil.rmtree(out_path + ".parts", ignore_errors=True)
        distributed.barrier()


class Timer:
    """Seconds since the last `lap` (for the sampling / scoring split of a step)."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds
