"""Exact resume: sharded checkpoints inside a GRPO stage (torch.distributed.checkpoint, DCP), the
part files generation and labeling resume from (`in_parts`), and the record of every finished
stage output, checked before a rerun reuses it (`check_outputs`).

A stage saves every `save_every` steps into

    RUN/checkpoints/<stage>/step_000010/   model and AdamW state (DCP shards of every rank),
                                           rng_rank<r>.pt (each rank's RNG states), meta.json

written as `step_000010.tmp` and renamed by rank 0 once every rank has finished writing: a folder
without `.tmp` is complete, so a run killed mid-write (even by SIGKILL) resumes from the previous
checkpoint and never reads a torn one. Everything random in a step derives from (seed, stage, step)
(`run.seed_for`), so model + optimizer + step number reproduce the uninterrupted run; the RNG
states are restored as well for code that draws from the global generators.
The temporary folder is shared by every rank, so it is made and renamed by rank 0 around the
ranks' writes (`data.move_into_place`, which fsyncs every file first) rather than with
`data.atomic_path`. A checkpoint counts only when it is whole (`complete`: its meta.json, every
byte its DCP metadata points to, every rank's RNG file); a torn one (a power loss, a disk that
filled up) is skipped with a warning that names it, for the previous one or the stage's start.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import distributed
from data import move_into_place, read_jsonl, remove_path, write_json, write_jsonl

_STEP = re.compile(r"^step_(\d+)$")
log = logging.getLogger("visplay")


def _rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def complete(path):
    """Why the checkpoint folder `path` cannot be loaded, or None when it is whole: meta.json,
    the DCP metadata, every byte range of every data file it names, and each rank's RNG file."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        stored = dcp.FileSystemReader(path).read_metadata().storage_data.values()
    except Exception as error:  # noqa: BLE001 (a pickle cut short fails in many ways)
        return f"unreadable ({type(error).__name__}: {error})"
    for item in stored:
        data = os.path.join(path, item.relative_path)
        if not os.path.isfile(data) or os.path.getsize(data) < item.offset + item.length:
            return f"data file {item.relative_path} missing or truncated"
    for rank in range(meta.get("world_size", 1)):
        try:
            torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False)
        except FileNotFoundError:
            return f"rng_rank{rank}.pt missing"
        except Exception as error:  # noqa: BLE001
            return f"rng_rank{rank}.pt unreadable ({type(error).__name__})"
    return None


def latest(folder):
    """(step, path) of the newest whole checkpoint in `folder`, or None. An unfinished `.tmp`
    folder is ignored and a torn checkpoint skipped, each with a warning naming it."""
    if not os.path.isdir(folder):
        return None
    names = sorted(os.listdir(folder), reverse=True)
    for name in names:
        if name.endswith(".tmp"):
            log.warning("discarding an unfinished checkpoint: %s", os.path.join(folder, name))
    for name in names:  # newest first
        if (m := _STEP.match(name)) is None:
            continue
        path = os.path.join(folder, name)
        problem = complete(path)
        if problem is None:
            return int(m.group(1)), path
        log.warning("skipping checkpoint %s: %s; falling back to the one before it (or the "
                    "stage's start)", path, problem)
    return None


def save(folder, step, model, optimizer, *, keep=1, extra=None):
    """Checkpoint after `step` completed steps: all ranks call this together. Keeps the newest
    `keep` checkpoints. extra: JSON data a stage needs to resume besides weights, optimizer and
    RNG (the spy game's baselines and stage switch), stored in meta.json; `load` returns it."""
    final = os.path.join(folder, f"step_{step:06d}")
    tmp = final + ".tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier()
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # DCP warns that one process is not distributed: that is fine
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    torch.save(_rng_states(), os.path.join(tmp, f"rng_rank{distributed.rank()}.pt"))
    distributed.barrier()
    if distributed.is_main():
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": distributed.world_size(),
                       "extra": extra}, f)
        move_into_place(tmp, final)
        steps = sorted(int(m.group(1)) for name in os.listdir(folder) if (m := _STEP.match(name)))
        stale = [f"step_{old:06d}" for old in steps[:-keep]]  # all but the newest `keep`
        stale += [name for name in os.listdir(folder) if name.endswith(".tmp")]  # killed writes
        for name in stale:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    distributed.barrier()


def load(path, model, optimizer):
    """Restore model, optimizer and this rank's RNG states from a checkpoint folder; returns its
    meta."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # DCP reshards, so another number of processes can resume too
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if meta["world_size"] == distributed.world_size():
        rng_path = os.path.join(path, f"rng_rank{distributed.rank()}.pt")
        _set_rng_states(torch.load(rng_path, weights_only=False))
    return meta


def remove(folder):
    """Delete a finished stage's checkpoints (its save_pretrained export replaces them), and the
    checkpoints/ folder once it is empty. The folder is first renamed away, in one step, so a kill
    during the deletion never leaves a half-deleted checkpoint where `latest` would find it."""
    if distributed.is_main():
        if os.path.isdir(folder):
            doomed = folder + ".removed"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        parent = os.path.dirname(folder)
        if os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
    distributed.barrier()


# ----------------------------------------------------------------------------
# Finished stage outputs: trusted only when they are what the run wrote

OUTPUTS = "outputs.json"  # RUN/outputs.json: {output name: its fingerprint}


def fingerprint(path):
    """What a finished output is: a file's size, SHA-256 and line count; a folder's (a
    save_pretrained model's) files and their sizes (hashing gigabytes of weights at every rerun
    would cost minutes; a file cut short changes its size)."""
    if os.path.isdir(path):
        return {"files": {os.path.relpath(os.path.join(folder, name), path):
                          os.path.getsize(os.path.join(folder, name))
                          for folder, _, names in sorted(os.walk(path)) for name in sorted(names)}}
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            lines += block.count(b"\n")
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest(), "lines": lines}


def _records(run_dir):
    path = os.path.join(run_dir, OUTPUTS)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("%s is not readable: the outputs are recorded again as they are", path)
        return {}


def record_outputs(run_dir, names):
    """Record what the outputs `names` (just finished) are, in RUN/outputs.json (rank 0)."""
    if distributed.is_main():
        records = _records(run_dir)
        records.update({name: fingerprint(os.path.join(run_dir, name)) for name in names})
        write_json(os.path.join(run_dir, OUTPUTS), records)
    distributed.barrier()


def check_outputs(run_dir, names):
    """Before a rerun reuses them: the outputs `names`, in the order the run makes them, against
    their records. The first that is not what the run wrote (cut short by a power loss or a full
    disk, or edited) is removed with every output made after it, with one warning naming it, so
    the rerun redoes exactly that stage and what follows. An output without a record (finished
    just before a kill) is recorded as it is."""
    if distributed.is_main():
        records, changed = _records(run_dir), False
        for index, name in enumerate(names):
            path = os.path.join(run_dir, name)
            if not os.path.exists(path):
                continue
            if name not in records:
                records[name], changed = fingerprint(path), True
            elif fingerprint(path) != records[name]:
                log.warning("%s is not what the run wrote (cut short or changed): it is made "
                            "again, and every output after it", path)
                for later in names[index:]:
                    remove_path(os.path.join(run_dir, later))
                    records.pop(later, None)
                changed = True
                break
        if changed:
            write_json(os.path.join(run_dir, OUTPUTS), records)
    distributed.barrier()


# ----------------------------------------------------------------------------
# Part files: generation and labeling resume at the first missing chunk


def in_parts(out_path, chunks, work):
    """Run work(chunk) -> rows for chunk = 0 .. chunks-1, split over ranks, resumable.

    Each chunk's rows go to OUT.parts/<chunk>.jsonl atomically; a rerun skips the parts that
    exist. Returns every row in chunk order on rank 0 (None on other ranks); `done_parts` removes
    the parts folder once the caller has written its results.
    """
    folder = out_path + ".parts"
    os.makedirs(folder, exist_ok=True)

    def part(chunk):
        return os.path.join(folder, f"{chunk:06d}.jsonl")

    # Only the missing chunks are split over ranks (after a resume, a rank whose share was done
    # would otherwise wait at the barrier for the others' whole share). Rank 0 lists them, so
    # every rank splits the same list.
    missing = [c for c in range(chunks) if not os.path.exists(part(c))] \
        if distributed.is_main() else []
    missing = distributed.all_gather_list(missing)
    if len(missing) < chunks:
        log.info("%s: reusing %d of %d finished parts from %s", os.path.basename(out_path),
                 chunks - len(missing), chunks, folder)
    for chunk in missing[distributed.rank()::distributed.world_size()]:
        write_jsonl(part(chunk), work(chunk))
    distributed.barrier()
    if not distributed.is_main():
        return None
    return [row for chunk in range(chunks) for row in read_jsonl(part(chunk))]


def done_parts(out_path):
    """Remove the part files of an output its stage has written."""
    if distributed.is_main():
        shutil.rmtree(out_path + ".parts", ignore_errors=True)
    distributed.barrier()


def step_outputs(iteration):
    """What each step of an iteration writes, in the order the run makes it: per step, its
    outputs, the last of which marks the step done (iteration 0: the base's evaluation)."""
    i = iteration
    if i == 0:
        return [("eval_v0_items.jsonl", "eval_v0.json")]
    return [(f"questioner_v{i}",), (f"questions_v{i}.jsonl",),
            (f"labeled_v{i}.jsonl", f"kept_v{i}.jsonl"), (f"reasoner_v{i}",),
            (f"eval_v{i}_items.jsonl", f"eval_v{i}.json")]


def clean_leftovers(run_dir, iteration):
    """Remove what a kill can leave behind a finished stage of a VisPlay iteration: the part
    files of an output already merged, the checkpoints of a stage already exported (and the
    checkpoints/ folder once empty). A rerun skips such a stage, so nothing else would."""
    if distributed.is_main():
        i = iteration
        for done, leftover in [(f"questions_v{i}.jsonl", f"questions_v{i}.jsonl.parts"),
                               (f"kept_v{i}.jsonl", f"labeled_v{i}.jsonl.parts"),
                               (f"questioner_v{i}", f"checkpoints/questioner_v{i}"),
                               (f"reasoner_v{i}", f"checkpoints/reasoner_v{i}")]:
            left = os.path.join(run_dir, leftover)
            for path in (left, left + ".removed"):
                if os.path.exists(os.path.join(run_dir, done)) and os.path.exists(path):
                    shutil.rmtree(path, ignore_errors=True)
                    log.info("removed %s, left by an interrupted run", path)
        folder = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    distributed.barrier()
