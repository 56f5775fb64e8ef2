"""Watching a run: where its numbers go (metrics.jsonl always; TensorBoard and Weights & Biases when
the config asks, `logging.backends`, under the same names), and how far it has come (`progress`,
`time_left`).

- Every GRPO step's row of metrics.jsonl, at its global step (its index in metrics.jsonl: the
  same for a resumed run as for an uninterrupted one), as `<stage>/<name>` (stage: questioner,
  reasoner or spy), the iteration included (`<stage>/iteration`).
- The per-iteration summary (held-out accuracy per benchmark and category, kept questions, the
  filter's yield, the questions' diversity) as `summary/...`, at step = iteration.
- The resolved config as the run's parameters (W&B's config, TensorBoard's text `config`).

Only rank 0 logs. A resumed run continues the same series with no step twice: TensorBoard purges
the events from the first step this process logs on (`purge_step`), W&B skips the steps and
iterations it already has (the last ones are kept in RUN/wandb/); W&B's x axes are `global_step`
and `summary/iteration`. TensorBoard's events go to RUN/tensorboard/
(`tensorboard --logdir RUN/tensorboard`); W&B's offline run to RUN/wandb/ (`wandb sync` it).
The packages are optional extras (requirements-extras.txt): `check_backends` refuses a missing
one in one line, before any work.
"""

import importlib.util
import json
import logging
import os
import shutil
import zlib

from tqdm import tqdm

from config import ConfigError, config_to_dict
from summary import question_yield

log = logging.getLogger("visplay")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the package it needs


def check_backends(cfg):
    """ConfigError naming the backend and its package when one the config asks for is missing."""
    for backend in cfg.logging.backends:
        package = PACKAGES.get(backend)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging.backends: {backend} needs the package {package}: pip "
                              "install -r requirements-extras.txt, or drop it from the list")


def scalars(row):
    """{name: number} of a metrics row under its stage's namespace (bools and non-numbers
    left out)."""
    stage = row.get("stage", "run")
    return {f"{stage}/{key}": float(value) for key, value in row.items()
            if key not in ("stage", "step") and isinstance(value, (int, float))
            and not isinstance(value, bool)}


def summary_scalars(row):
    """{name: number} of one per-iteration summary row (`summary.iteration_summary`)."""
    out = {}
    for bench, scores in row.get("eval", {}).items():
        for key in ("accuracy", "pass@1", "majority@k", "pass@k"):
            if scores.get(key) is not None:
                out[f"summary/{bench}/{key}"] = float(scores[key])
        for category, accuracy in scores.get("by_category", {}).items():
            out[f"summary/{bench}/category/{category}"] = float(accuracy)
    for key in ("kept", "labeled", "generated", "invalid_rate", "confidence_mean",
                "kept_confidence_mean", "silver_accuracy", "distinct_ratio", "mean_pairwise_bleu"):
        if row.get(key) is not None:
            out[f"summary/{key}"] = float(row[key])
    for key in ("family_mix", "kept_family_mix"):
        for family, share in row.get(key, {}).items():
            out[f"summary/{key}/{family}"] = float(share)
    if question_yield(row) is not None:
        out["summary/yield"] = question_yield(row)
    return out


def _last(path):
    """The step or iteration W&B last got, as kept in `path` (-1: none yet)."""
    if not os.path.isfile(path):
        return -1
    with open(path) as f:
        return int(f.read())


class Tracker:
    """The backends of one run (rank 0 only; `Run.tracker` makes it). `log` takes a metrics
    row at its global step, `log_summaries` the summary rows so far, `close` flushes."""

    def __init__(self, cfg, run_dir):
        self.cfg, self.dir = cfg, run_dir
        self.backends = [b for b in cfg.logging.backends if b != "jsonl"]
        self.tensorboard = self.wandb = None
        self.wandb_last = None

    def _open_tensorboard(self, step):
        """TensorBoard's writer of the steps' series, opened at the first row this process logs
        (`step`): what an interrupted process logged from there on is dropped (purge_step)."""
        if "tensorboard" in self.backends and self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(self.dir, "tensorboard", "train"),
                                             purge_step=step)
            self.tensorboard.add_text("config", "```\n" + json.dumps(
                config_to_dict(self.cfg), indent=1) + "\n```", global_step=step)

    def _open_wandb(self):
        if "wandb" in self.backends and self.wandb is None:
            import wandb

            folder = os.path.join(self.dir, "wandb")
            os.makedirs(folder, exist_ok=True)
            run_id = f"visplay-{zlib.crc32(os.path.abspath(self.dir).encode()):08x}"
            self.wandb = wandb.init(project=self.cfg.logging.wandb_project, id=run_id,
                                    name=os.path.basename(os.path.normpath(self.dir)),
                                    dir=self.dir, mode=self.cfg.logging.wandb_mode,
                                    config=config_to_dict(self.cfg), resume="allow")
            # x axes of W&B's own: the global step for the stages' rows, the iteration for the
            # summary (W&B's internal step only counts log calls)
            self.wandb.define_metric("global_step")
            for stage in ("questioner", "reasoner", "spy"):
                self.wandb.define_metric(f"{stage}/*", step_metric="global_step")
            self.wandb.define_metric("summary/iteration")
            self.wandb.define_metric("summary/*", step_metric="summary/iteration")
            self.wandb_last = _last(os.path.join(folder, "last_step"))

    def log(self, row, step):
        """One metrics row at global step `step`."""
        if not self.backends:
            return
        self._open_tensorboard(step)
        self._open_wandb()
        values = scalars(row)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()  # on disk before a kill: the resume purges only what follows
        if self.wandb is not None and step > self.wandb_last:
            self.wandb.log({"global_step": step, **values})
            self.wandb_last = step
            with open(os.path.join(self.dir, "wandb", "last_step"), "w") as f:
                f.write(str(step))

    def log_summaries(self, summaries):
        """The summary rows so far (one per iteration). TensorBoard's summary series is written
        anew each time (RUN/tensorboard/summary), so a rerun never shows an iteration twice;
        W&B gets the iterations it has not had, along its own axis (summary/iteration)."""
        if not self.backends:
            return
        self._open_wandb()
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            folder = os.path.join(self.dir, "tensorboard", "summary")
            shutil.rmtree(folder, ignore_errors=True)
            writer = SummaryWriter(folder)
            for row in summaries:
                for name, value in summary_scalars(row).items():
                    writer.add_scalar(name, value, global_step=row["iteration"])
            writer.close()
        if self.wandb is not None:
            path = os.path.join(self.dir, "wandb", "last_iteration")
            done = _last(path)
            for row in summaries:
                if row["iteration"] > done:
                    self.wandb.log({"summary/iteration": row["iteration"],
                                    **summary_scalars(row)})
                    done = row["iteration"]
            with open(path, "w") as f:
                f.write(str(done))

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------
# How far the run has come


def progress(total, done, label, show=True):
    """A progress bar over a stage's steps (steps done, rate, time left), drawn on a terminal
    only: redirected to a file, the run's log keeps its one line per step and no bar redraws.
    show: False on every rank but rank 0."""
    return tqdm(total=total, initial=done, desc=label, unit="step", leave=False,
                disable=None if show else True, dynamic_ncols=True)


def time_left(durations, remaining):
    """What is left, from the stages already timed: durations {kind: [seconds, ...]} of the
    stages this process ran; remaining: the kinds of the stages still to run, this one
    included. Returns a phrase: "about 12 min left", and which kinds are not timed yet."""
    known = [sum(durations[kind]) / len(durations[kind]) for kind in remaining
             if durations.get(kind)]
    unknown = sorted({kind for kind in remaining if not durations.get(kind)},
                     key=remaining.index)
    if not known:
        return "time left: not measured yet"
    phrase = f"about {sum(known) / 60:.1f} min left"
    return phrase + (f", besides {', '.join(unknown)} (not timed yet)" if unknown else "")
