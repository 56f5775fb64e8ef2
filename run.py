"""A run's machinery: its directory and sources, its models on disk and in memory, resume
bookkeeping and part files. `visplay.py` holds the algorithm; this module what its stages need.

- `Run`: the resolved config, the run directory, the device, the image pool and the benchmarks.
  Every path the config names is checked first (`check_sources`), before any expensive work
  (building the embedded default's world, loading a model).
- `Run.load_model` / `Run.export`: a checkpoint folder in, sharded over ranks under torchrun
  (FSDP2); a `save_pretrained` folder out, written by rank 0, atomically.
- `Run.restart_metrics` / `Run.log_metrics`: metrics.jsonl, one row per GRPO step, the same after
  a resume as without one.
- `Run.in_parts` / `Run.done_parts`: work split into chunks over ranks, each chunk's rows saved as
  a part file (a killed stage resumes at the first missing part), merged in order by rank 0.
- `seed_for`: the seed of every random choice, from the config's seed and where it is made.
"""

import json
import os
import shutil
import zlib

import torch
import yaml

import distributed
from benchmark_files import load_benchmark
from config import ConfigError, config_to_dict
from data import ImagePool, atomic_path, list_images, read_jsonl, write_jsonl
from distributed import is_sharded, shard_model
from grpo import FORWARD_METHODS
from vlm import check_model_dir, load_vlm, save_vlm


def seed_for(seed, *parts):
    """A seed for one random choice of the run, from the config's seed and where it is made."""
    return zlib.crc32("/".join(map(str, (seed,) + parts)).encode())


def check_sources(cfg):
    """Read what the config names, quickly: (image paths or None, {benchmark name: items}).

    A model folder without config.json (or a model without images), a missing or empty image
    folder or manifest, a missing benchmark file or one without a usable row is a ConfigError
    naming the key.
    """
    if cfg.model.path is not None:
        try:
            check_model_dir(cfg.model.path)
        except FileNotFoundError as error:
            raise ConfigError(f"model.path: {error}, or leave model.path empty for the embedded "
                              "default") from None
        if cfg.data.images is None:
            raise ConfigError("data.images: a run on model.path needs a folder or a JSONL "
                              "manifest of images")
    image_paths = None
    if cfg.data.images is not None:
        try:
            image_paths = list_images(cfg.data.images)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.images: {error}") from None
    benchmarks = {}
    for name, path in cfg.eval.benchmarks.items():
        try:
            benchmarks[name] = load_benchmark(path)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"eval.benchmarks.{name}: {error}") from None
    return image_paths, benchmarks


class Run:
    """Everything a stage needs besides its own inputs. Construct on every rank."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = cfg.run_dir
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = distributed.init("cuda" if want_cuda else "cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        for role in ("questioner", "reasoner"):
            stage = getattr(cfg, role)
            if stage.prompts_per_step % (stage.updates_per_step * distributed.world_size()):
                raise ConfigError(
                    f"{role}.prompts_per_step ({stage.prompts_per_step}) must be a multiple of "
                    f"updates_per_step x processes ({stage.updates_per_step} x "
                    f"{distributed.world_size()}): every rank takes an equal share of every update")
        image_paths, self.benchmarks = check_sources(cfg)
        if distributed.is_main():
            os.makedirs(self.dir, exist_ok=True)
        self.base = cfg.model.path
        if cfg.model.path is None:  # the embedded default fills in what the config leaves empty
            world = self._embedded_world()
            self.base = world["base"]
            if image_paths is None:
                image_paths = list_images(world["pool"])
            if not self.benchmarks:
                self.benchmarks = {"toyworld": load_benchmark(world["benchmark"])}
        if cfg.data.max_images is not None:
            image_paths = image_paths[:cfg.data.max_images]
        self.pool = ImagePool(image_paths, cfg.model.min_pixels, cfg.model.max_pixels)
        self.metrics_path = self.path("metrics.jsonl")
        distributed.barrier()  # rank 0 has made the run directory

    def _embedded_world(self):
        """The toy world's base, pool and benchmark (`toyworld.build_embedded`), built by rank 0
        the first time, then found by every rank."""
        import toyworld

        if distributed.is_main():
            world = toyworld.build_embedded(self.path("embedded"), self.cfg.seed)
        distributed.barrier()
        if not distributed.is_main():
            world = toyworld.build_embedded(self.path("embedded"), self.cfg.seed)
        return world

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def check_config(self):
        """Save the resolved config; refuse to resume a run directory made with another config."""
        path = self.path("config.yaml")
        current = config_to_dict(self.cfg)
        if os.path.exists(path):
            with open(path) as f:
                previous = yaml.safe_load(f)
            for section in current:
                if section in ("iterations", "eval", "save_every"):
                    continue
                if previous.get(section) != current[section]:
                    raise ConfigError(
                        f"run_dir {self.dir!r} holds a run made with a different {section!r} "
                        "setting; use another run_dir (--set run_dir=...) or delete that folder "
                        "to start over")
        if distributed.is_main():
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                yaml.safe_dump(current, f, sort_keys=False)

    def generator(self, *parts):
        """A torch generator for one random choice; each rank draws its own stream."""
        seed = seed_for(self.cfg.seed, *parts, distributed.rank())
        return torch.Generator(self.device).manual_seed(seed)

    # ------------------------------------------------------------------ models

    def load_model(self, path, trainable):
        """A model and its processor from a folder; sharded with FSDP2 when several processes run.

        Single process: weights in model.dtype. Sharded: fp32 master weights, computed in bf16 when
        model.dtype is bfloat16 (mixed precision). Every rank reads the folder (CPU memory: one
        copy of the weights per process while loading).
        """
        settings = self.cfg.model
        sharded = distributed.active()
        model, processor = load_vlm(path, dtype=torch.float32 if sharded else self.dtype,
                                    device="cpu" if sharded else self.device,
                                    attn_implementation=settings.attn_implementation)
        processor.image_processor.size = {"shortest_edge": settings.min_pixels,
                                          "longest_edge": settings.max_pixels}
        model.eval()
        for name, param in model.named_parameters():
            frozen = settings.freeze_vision and ".visual." in f".{name}"
            param.requires_grad_(trainable and not frozen)
        if sharded:
            model.to(self.device)
            shard_model(model, mixed_precision=self.dtype == torch.bfloat16,
                        cpu_offload=settings.cpu_offload,
                        activation_checkpointing=trainable and settings.activation_checkpointing,
                        forward_methods=FORWARD_METHODS)
        return model, processor

    def export(self, model, processor, path):
        """`save_pretrained` folder of a (possibly sharded) model, in model.dtype, by rank 0."""
        state = None
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(model, options=options)
            state = {name: tensor.to(self.dtype) for name, tensor in full.items()}
        if distributed.is_main():
            save_vlm(model, processor, path, state_dict=state)
        distributed.barrier()

    # ------------------------------------------------------------------ metrics

    def restart_metrics(self, iteration, stage, from_step=0):
        """Drop the metric rows of this stage from `from_step` on (an interrupted attempt wrote
        them)."""
        if distributed.is_main() and os.path.exists(self.metrics_path):
            rows = [r for r in read_jsonl(self.metrics_path) if not (
                r.get("iteration") == iteration and r.get("stage") == stage
                and r.get("step", 0) >= from_step)]
            write_jsonl(self.metrics_path, rows)

    def log_metrics(self, row):
        if distributed.is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ part files

    def in_parts(self, out_path, chunks, work):
        """Run work(chunk) -> rows for chunk = 0 .. chunks-1, split over ranks, resumable.

        Each chunk's rows go to OUT.parts/<chunk>.jsonl atomically; a rerun skips the parts that
        exist. Returns every row in chunk order on rank 0 (None on other ranks); `done_parts`
        removes the parts folder once the caller has written its results.
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
        return [row for chunk in range(chunks)
                for row in read_jsonl(os.path.join(folder, f"{chunk:06d}.jsonl"))]

    def done_parts(self, out_path):
        if distributed.is_main():
            shutil.rmtree(out_path + ".parts", ignore_errors=True)
        distributed.barrier()
