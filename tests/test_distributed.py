"""Data parallel FSDP2 (2 CPU processes, gloo) equals one process; checkpoints resume exactly.

The workers run in processes started with torch.multiprocessing.spawn; each test writes what the
workers need into a temporary folder and the workers write their results back there.
"""

import copy
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import checkpoint
import distributed
import grpo
import visplay
from config import ReasonerConfig
from distributed import shard_model
from grpo import Learner, RolloutBatch, train_step
from models.inputs import encode_prompt, special_tokens
from models.load import load_vlm
from models.logprobs import FORWARD_METHODS
from rewards import diversity_penalty
from sampler import Rollout, Sampling, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(*args)
    distributed.close()  # as `visplay.main` does: after the work, never after an error


def spawn_two(fn, *args):
    """Run fn in 2 gloo processes. A worker killed by a signal (not a Python error: gloo's C++
    threads have aborted a process once in CI, on a busy machine, in a test that passes hundreds
    of times here) is retried once, on a fresh port, with its output files rewritten; a failed
    assertion or any other Python error in a worker fails the test at once."""
    for attempt in (1, 2):
        try:
            mp.spawn(_entry, args=(2, _free_port(), fn, args), nprocs=2, join=True)
            return
        except mp.ProcessExitedException as error:
            if attempt == 2 or error.signal_name is None:
                raise
            print(f"spawn_two: {error}; retrying once", file=sys.stderr)


# ----------------------------------------------------------------------------- one GRPO update


def _images():
    colours = [(200, 30, 30), (30, 160, 60), (40, 70, 210), (230, 200, 40)]
    return [Image.new("RGB", (56 + 28 * (i % 2), 56), colours[i]) for i in range(4)]


def _prompts(processor):
    texts = ["How many objects are there?", "Is there a red circle?", "How many circles are there?",
             "Are there more red objects than blue objects?"]
    return [encode_prompt(processor, image, text) for image, text in zip(_images(), texts)]


def _config(shared_prefix=True):
    # grad_clip binds (the clipped norm is computed from every rank's shards), KL to a
    # reference is on
    return ReasonerConfig(prompts_per_step=4, group_size=2, updates_per_step=2, micro_batch_size=1,
                          lr=1.0, grad_clip=0.05, kl_coef=0.05, temperature=1.0,
                          loss_agg="token-mean", logprob_chunk=3, shared_prefix=shared_prefix)


def _update(model_dir, prompts, sampled, rewards, sharded, shared_prefix=True, cfg=None):
    """One train_step (2 optimizer updates, or as `cfg` says) with SGD(lr=1): the parameter change
    is the gradient itself (Adam would turn rounding noise in a ~1e-9 gradient into a full
    lr-sized step, so equal Adam steps would not show equal gradients)."""
    model, processor = load_vlm(model_dir)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if sharded:
        shard_model(model, mixed_precision=False, forward_methods=FORWARD_METHODS)
        shard_model(reference, mixed_precision=False, forward_methods=FORWARD_METHODS)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    learner = Learner(model, optimizer, reference, special_tokens(processor, model))
    metrics = train_step(learner, RolloutBatch(prompts, sampled, rewards),
                         cfg or _config(shared_prefix))
    return model, metrics


def _full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _update_worker(model_dir, folder):
    _, processor = load_vlm(model_dir)
    prompts = _prompts(processor)
    data = torch.load(os.path.join(folder, "batch.pt"))
    # rank 0: prompts 0, 2; rank 1: 1, 3
    mine = distributed.my_part(list(range(len(prompts))), blocks=2)
    rows = [r for p in mine for r in range(len(data["prompt_index"]))
            if data["prompt_index"][r] == p]
    local_index = torch.tensor([mine.index(int(data["prompt_index"][r])) for r in rows])
    local = Rollout(local_index, data["completion_ids"][rows], data["completion_mask"][rows],
                    data["logprobs"][rows])
    cfg = ReasonerConfig(**data["cfg"]) if "cfg" in data else None
    model, metrics = _update(model_dir, [prompts[i] for i in mine], local, data["rewards"][rows],
                             sharded=True, cfg=cfg)
    state = _full_state(model)
    if distributed.is_main():
        torch.save({"state": state, "metrics": metrics}, os.path.join(folder, "sharded.pt"))


def test_one_grpo_update_under_fsdp2_equals_single_process(tiny_model_dir, tmp_path):
    """One train_step (shared-prefix training forward) on 2 gloo ranks, 2 prompts each, equals one
    process with one row per completion (the obvious forward), and one process with the shared
    prefix: weights and metrics."""
    model, processor = load_vlm(tiny_model_dir)
    prompts = _prompts(processor)
    tokens = special_tokens(processor, model)
    sampled = sample(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6), tokens=tokens,
                     generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0])
    torch.save({"prompt_index": sampled.prompt_index, "completion_ids": sampled.completion_ids,
                "completion_mask": sampled.completion_mask, "logprobs": sampled.logprobs,
                "rewards": rewards},
               tmp_path / "batch.pt")
    single, single_metrics = _update(tiny_model_dir, prompts, sampled, rewards, sharded=False,
                                     shared_prefix=False)
    shared, shared_metrics = _update(tiny_model_dir, prompts, sampled, rewards, sharded=False)
    spawn_two(_update_worker, tiny_model_dir, str(tmp_path))
    sharded = torch.load(tmp_path / "sharded.pt")

    before = model.state_dict()
    moved = 0
    shared_state = shared.state_dict()
    for name, value in single.state_dict().items():
        assert torch.allclose(sharded["state"][name], value, atol=1e-5, rtol=0), name
        assert torch.allclose(shared_state[name], value, atol=1e-5, rtol=0), name
        moved += not torch.equal(value, before[name])
    assert moved > 10  # the update changed the weights, so equality is not trivial
    for key in ("loss", "kl", "grad_norm", "reward_mean", "reward_std", "advantage_std",
                "clip_frac_high", "response_length_mean", "entropy"):
        assert sharded["metrics"][key] == pytest.approx(single_metrics[key], abs=1e-5), key
        assert shared_metrics[key] == pytest.approx(single_metrics[key], abs=1e-5), key


def test_zero_advantage_skip_under_fsdp2_equals_single_process(tiny_model_dir, tmp_path):
    """Without a KL term the update skips rows whose advantage is 0; here rank 0's second
    mini-batch is one such group while rank 1's is trained, so the ranks would run different
    numbers of forwards (a hang under FSDP2) unless rank 0 forwards skipped rows too. 2 gloo
    ranks equal one process: weights and metrics."""
    model, processor = load_vlm(tiny_model_dir)
    prompts = _prompts(processor)
    sampled = sample(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6),
                     tokens=special_tokens(processor, model),
                     generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0])  # prompt 2 (rank 0): no signal
    cfg = dict(prompts_per_step=4, group_size=2, updates_per_step=2, micro_batch_size=1, lr=1.0,
               grad_clip=0.05, kl_coef=0.0, temperature=1.0, loss_agg="token-mean",
               logprob_chunk=3)
    torch.save({"prompt_index": sampled.prompt_index, "completion_ids": sampled.completion_ids,
                "completion_mask": sampled.completion_mask, "logprobs": sampled.logprobs,
                "rewards": rewards, "cfg": cfg},
               tmp_path / "batch.pt")
    single, single_metrics = _update(tiny_model_dir, prompts, sampled, rewards, sharded=False,
                                     cfg=ReasonerConfig(**cfg))
    spawn_two(_update_worker, tiny_model_dir, str(tmp_path))
    sharded = torch.load(tmp_path / "sharded.pt")
    before = model.state_dict()
    moved = 0
    for name, value in single.state_dict().items():
        assert torch.allclose(sharded["state"][name], value, atol=1e-5, rtol=0), name
        moved += not torch.equal(value, before[name])
    assert moved > 10
    assert single_metrics["rows_trained"] == 0.75
    assert single_metrics["zero_advantage_groups"] == 0.25
    for key in ("loss", "grad_norm", "reward_mean", "entropy", "rows_trained",
                "zero_advantage_groups"):
        assert sharded["metrics"][key] == pytest.approx(single_metrics[key], abs=1e-5), key


def _dynamic_sampling_worker(folder):
    from test_grpo import _fake_batch

    # rank 0 finds 1 informative group of 2 in its first draw, rank 1 both: both draw round 1
    first = [[1, 0, 1, 1], [1, 0, 0.2, 0.3]][distributed.rank()]
    calls = []

    def sample_more(round_):
        calls.append(round_)
        return _fake_batch([0, 1, 0.5, 0.7], 2, 2, 10 * round_)

    batch = grpo.dynamic_sampling(_fake_batch(first, 2, 2, 0), sample_more, rounds=3,
                                  updates_per_step=1, pad_id=-1)
    torch.save({"calls": calls, "prompts": batch.prompts, "metrics": batch.metrics},
               os.path.join(folder, f"rank{distributed.rank()}.pt"))


def test_dynamic_sampling_draws_the_same_rounds_on_every_rank(tmp_path):
    """A rank that has its full batch still draws while another has not (each rank's sampling
    and updates must stay in step); each keeps 2 groups; the shares count both ranks."""
    spawn_two(_dynamic_sampling_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["calls"] for r in ranks] == [[1], [1]]
    assert ranks[0]["prompts"] == ["0-0", "10-0"] and ranks[1]["prompts"] == ["0-0", "0-1"]
    for r in ranks:
        assert r["metrics"] == {"seconds_sampling": 2.0, "sampling_rounds": 2,
                                "informative_share": 7 / 8, "groups_kept": 1.0}


# ----------------------------------------------------------------------------- gathered statistics


def _penalty_worker(questions, folder):
    mine = [questions[i] for i in distributed.my_share(len(questions))]
    penalty = visplay.step_diversity_penalty(mine, 0.5)
    everything = distributed.all_gather_list(penalty.tolist())
    if distributed.is_main():
        torch.save(everything, os.path.join(folder, "penalty.pt"))


def test_diversity_penalty_across_two_ranks_equals_single_process(tmp_path):
    questions = ["how many red circles are there ?",
                 "how many red circles are there in the image ?", "is there a blue square ?",
                 "how many red circles are there ?", "is there a blue square here ?",
                 "what color is the shape in row 2 ?",
                 "how many objects are there ?"]  # 7: unequal shares
    spawn_two(_penalty_worker, questions, str(tmp_path))
    assert torch.load(tmp_path / "penalty.pt") == pytest.approx(
        diversity_penalty(questions, 0.5).tolist())


# ----------------------------------------------------------------------------- loading


def _load_worker(model_dir, image_dir, benchmark_file, folder):
    """`Run.load_model` under torchrun: rank 1 never reads the weights (the model is built on the
    meta device and filled from rank 0's broadcast)."""
    from config import load_config
    from run import Run

    cfg = load_config(os.path.join(ROOT, "config.yaml"), [
        f"run_dir={os.path.join(folder, 'run')}", f"model.path={model_dir}",
        f"data.images={image_dir}", f"eval.benchmarks={{tiny: {benchmark_file}}}",
        "device=cpu", "model.dtype=bfloat16", "questioner.prompts_per_step=4",
        "reasoner.prompts_per_step=4"])
    run = Run(cfg)
    policy, processor = run.load_model(model_dir, trainable=True)
    frozen, _ = run.load_model(model_dir, trainable=False)
    prompts = _prompts(processor)[:2]
    sampled = torch.load(os.path.join(folder, "batch.pt"))
    from models.logprobs import completion_logprobs

    with torch.no_grad():
        logprobs, _ = completion_logprobs(policy, [prompts[i] for i in sampled["prompt_index"]],
                                          sampled["completion_ids"], sampled["completion_mask"],
                                          tokens=special_tokens(processor, policy))
    result = {"state": _full_state(policy), "logprobs": logprobs,
              "buffers": {n: b.clone() for n, b in policy.named_buffers()},
              "policy_dtypes": {p.dtype for p in policy.parameters()},
              "trainable": all(p.requires_grad for p in policy.parameters()),
              "frozen_dtypes": {p.dtype for p in frozen.parameters()},
              "frozen_trainable": any(p.requires_grad for p in frozen.parameters())}
    torch.save(result, os.path.join(folder, f"load_rank{distributed.rank()}.pt"))


def _release_worker(model_dir, image_dir, benchmark_file, folder):
    """A sharded model sits in reference cycles (FSDP2's hooks, the bound forward methods): once
    dropped it stays alive until a collection, which `run.free_memory` runs."""
    import gc
    import weakref

    from config import load_config
    from run import Run, free_memory

    run = Run(load_config(os.path.join(ROOT, "config.yaml"), [
        f"run_dir={os.path.join(folder, 'run')}", f"model.path={model_dir}",
        f"data.images={image_dir}", f"eval.benchmarks={{tiny: {benchmark_file}}}",
        "device=cpu", "questioner.prompts_per_step=4", "reasoner.prompts_per_step=4"]))
    gc.disable()
    try:
        policy, _ = run.load_model(model_dir, trainable=True)
        frozen, _ = run.load_model(model_dir, trainable=False)
        refs = [weakref.ref(policy), weakref.ref(frozen)]
        del policy, frozen
        alive_after_del = sum(ref() is not None for ref in refs)
        free_memory()
        alive_after_free = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    torch.save([alive_after_del, alive_after_free],
               os.path.join(folder, f"release_rank{distributed.rank()}.pt"))


def test_sharded_models_are_freed_by_free_memory(tiny_model_dir, image_dir, benchmark_file,
                                                 tmp_path):
    spawn_two(_release_worker, tiny_model_dir, image_dir, benchmark_file, str(tmp_path))
    for rank in (0, 1):
        # both models survive `del` (so the collection is needed), and none survives it
        assert torch.load(tmp_path / f"release_rank{rank}.pt") == [2, 0]


def test_sharded_load_reads_weights_once_and_equals_a_full_load(tiny_model_dir, image_dir,
                                                               benchmark_file, tmp_path):
    """The sharded policy (fp32 master weights, bf16 compute) and the frozen model (bf16) hold
    exactly the checkpoint's weights and buffers, and the policy computes the same log-probs
    (in bf16) as a single-process fp32 model does to bf16 precision."""
    model, processor = load_vlm(tiny_model_dir)
    tokens = special_tokens(processor, model)
    prompts = _prompts(processor)[:2]
    sampled = sample(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6),
                     tokens=tokens, generator=torch.Generator().manual_seed(3))
    torch.save({"prompt_index": sampled.prompt_index.tolist(),
                "completion_ids": sampled.completion_ids,
                "completion_mask": sampled.completion_mask}, tmp_path / "batch.pt")
    spawn_two(_load_worker, tiny_model_dir, image_dir, benchmark_file, str(tmp_path))
    expected = model.state_dict()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"load_rank{rank}.pt", weights_only=False)
        if rank == 0:  # the full state is gathered to rank 0 only
            assert result["state"].keys() == expected.keys()
            for name, value in expected.items():
                assert torch.equal(result["state"][name], value), name
        for name, value in model.named_buffers():
            assert torch.equal(result["buffers"][name], value), name
        assert result["policy_dtypes"] == {torch.float32} and result["trainable"]
        assert result["frozen_dtypes"] == {torch.bfloat16} and not result["frozen_trainable"]
        mask = sampled.completion_mask.bool()
        assert torch.allclose(result["logprobs"][mask], sampled.logprobs[mask], atol=0.1)


# ----------------------------------------------------------------------------- frozen models


def _record_length(model):
    return len(model._get_fsdp_state()._comm_ctx.post_forward_order)


def _frozen_worker(model_dir, folder):
    """Five no-grad forwards of a sharded model, frozen and trainable: FSDP2's record of forwards
    (cleared only by a backward) stays bounded for the frozen one, and grows on the other (which
    shows what the frozen model is spared)."""
    _, processor = load_vlm(model_dir)
    prompts = _prompts(processor)
    lengths = {}
    for frozen in (True, False):
        model, _ = load_vlm(model_dir)
        for p in model.parameters():
            p.requires_grad_(not frozen)
        shard_model(model, mixed_precision=False, forward_methods=FORWARD_METHODS)
        tokens = special_tokens(processor, model)
        with torch.no_grad():
            for _ in range(5):
                sample(model, prompts[:1], group_size=1, sampling=Sampling(0.0, 1.0, 0, 1),
                       tokens=tokens)
        lengths[frozen] = _record_length(model)
    units = sum(hasattr(m, "unshard") for m in model.modules())
    if distributed.is_main():
        torch.save({"lengths": lengths, "units": units}, os.path.join(folder, "frozen.pt"))


def test_frozen_sharded_model_does_not_grow_fsdp_bookkeeping(tiny_model_dir, tmp_path):
    spawn_two(_frozen_worker, tiny_model_dir, str(tmp_path))
    result = torch.load(tmp_path / "frozen.pt")
    assert result["lengths"][True] <= result["units"]           # the last forward's record only
    assert result["lengths"][False] == 5 * result["units"]      # one entry per unit per forward


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_worker(model_dir, folder):
    model, _ = load_vlm(model_dir)
    shard_model(model, mixed_precision=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():  # one step so the optimizer has state to save
        p.grad = torch.ones_like(p) * 1e-3
    optimizer.step()
    checkpoint.save(os.path.join(folder, "ckpt"), 7, model, optimizer)
    fresh, _ = load_vlm(model_dir)
    shard_model(fresh, mixed_precision=False)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    step, path = checkpoint.latest(os.path.join(folder, "ckpt"))
    checkpoint.load(path, fresh, fresh_optimizer)
    a, b = _full_state(model), _full_state(fresh)
    same_optimizer = all(torch.equal(x["exp_avg_sq"].full_tensor(), y["exp_avg_sq"].full_tensor())
                         for x, y in zip(optimizer.state.values(), fresh_optimizer.state.values()))
    if distributed.is_main():
        torch.save({"step": step, "same_model": all(torch.equal(a[k], b[k]) for k in a),
                    "same_optimizer": same_optimizer, "states": len(fresh_optimizer.state)},
                   os.path.join(folder, "result.pt"))


def test_sharded_checkpoint_round_trip(tiny_model_dir, tmp_path):
    spawn_two(_checkpoint_worker, tiny_model_dir, str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    assert (result["step"] == 7 and result["same_model"] and result["same_optimizer"]
            and result["states"] > 0)
    assert sorted(os.listdir(tmp_path / "ckpt" / "step_000007")).count("rng_rank1.pt") == 1


def test_torn_checkpoints_are_ignored(tiny_model_dir, tmp_path):
    model, _ = load_vlm(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint.save(str(tmp_path), 2, model, optimizer)
    os.makedirs(tmp_path / "step_000004.tmp")  # killed while writing
    (tmp_path / "step_000004.tmp" / "__0_0.distcp").write_bytes(b"partial")
    # renamed folder without its meta.json: not complete either
    os.makedirs(tmp_path / "step_000003")
    assert checkpoint.latest(str(tmp_path)) == (2, str(tmp_path / "step_000002"))


@pytest.mark.parametrize("tear", ["truncated data", "missing data", "missing rng",
                                  "garbled meta", "metadata cut to 50%", "metadata cut to 90%",
                                  "rng cut to 50%"])
def test_torn_checkpoint_falls_back_with_a_warning_naming_it(tiny_model_dir, tmp_path, caplog,
                                                             tear):
    """A checkpoint renamed into place but torn afterwards (power loss, a full disk) is skipped
    for the one before it, with a warning that names the folder and what is wrong."""
    model, _ = load_vlm(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint.save(str(tmp_path), 2, model, optimizer, keep=2)
    checkpoint.save(str(tmp_path), 4, model, optimizer, keep=2)
    newest = tmp_path / "step_000004"
    data = sorted(newest.glob("*.distcp"))[0]
    if tear == "truncated data":
        data.write_bytes(data.read_bytes()[:100])
    elif tear == "missing data":
        data.unlink()
    elif tear == "missing rng":
        (newest / "rng_rank0.pt").unlink()
    elif tear == "garbled meta":
        (newest / "meta.json").write_text("{not json")
    else:  # a pickle cut short: DCP's .metadata or an RNG file
        torn = newest / (".metadata" if tear.startswith("metadata") else "rng_rank0.pt")
        whole = torn.read_bytes()
        torn.write_bytes(whole[:len(whole) * int(tear[-3:-1]) // 100])
    caplog.set_level("WARNING", logger="visplay")
    assert checkpoint.latest(str(tmp_path)) == (2, str(tmp_path / "step_000002"))
    warnings = [r.message for r in caplog.records if "skipping checkpoint" in r.message]
    assert len(warnings) == 1 and str(newest) in warnings[0]
    assert checkpoint.complete(str(tmp_path / "step_000002")) is None


def test_removed_checkpoints_leave_no_folder(tiny_model_dir, tmp_path):
    model, _ = load_vlm(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stage = tmp_path / "checkpoints" / "reasoner_v1"
    checkpoint.save(str(stage), 1, model, optimizer)
    checkpoint.remove(str(stage))
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- kill and resume


def _tiny_run(run_dir, model_dir, image_dir, benchmark_file):
    from test_loop import tiny_overrides

    return tiny_overrides(run_dir, model_dir, image_dir, benchmark_file) + [
        "save_every=1", "questioner.steps=5", "reasoner.steps=4", "eval.samples=0"]


def run_cli(overrides, config="config.yaml"):
    """`python visplay.py --config CONFIG --set ...` started in the background (stderr piped)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [sys.executable, os.path.join(ROOT, "visplay.py"), "--config",
            os.path.join(ROOT, config)]
    return subprocess.Popen(args + [a for o in overrides for a in ("--set", o)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def sigkill_when_written(process, marker, timeout=300):
    """SIGKILL `process` as soon as the file or folder `marker` exists (it must, before the
    process ends by itself)."""
    deadline = time.time() + timeout
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(marker), "the run ended before the checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("kill_when, torn", [("questioner_v1/step_000002", False),
                                             ("reasoner_v1/step_000003", False),
                                             ("reasoner_v1/step_000002", True)])
def test_sigkill_then_resume_equals_uninterrupted_run(kill_when, torn, format_model_dir, image_dir,
                                                      benchmark_file, tmp_path):
    """SIGKILL the run once a checkpoint exists inside a GRPO stage; the rerun resumes from it and
    ends with exactly (bitwise) the weights and files of an uninterrupted run. Torn: the newest
    checkpoint's data is then truncated; the rerun skips it and redoes the stage from its start
    (keep 1: it is the only one), or from the one before it if the kill came between the save of
    one and the removal of the other, to the same end."""
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    done = run_cli(_tiny_run(clean, format_model_dir, image_dir, benchmark_file))
    process = run_cli(_tiny_run(killed, format_model_dir, image_dir, benchmark_file))
    sigkill_when_written(process, os.path.join(killed, "checkpoints", kill_when))
    assert not os.path.exists(os.path.join(killed, "reasoner_v1"))  # it really died mid-run
    older = False  # a whole checkpoint older than the torn one (killed between the save of the
    if torn:       # newest and the removal of the one before it): the rerun falls back to it
        stage = os.path.join(killed, "checkpoints", kill_when.split("/")[0])
        _, newest = checkpoint.latest(stage)
        older = any(name.startswith("step_") and not name.endswith(".tmp")  # and whole: the
                    and name < os.path.basename(newest)  # kill may have cut its removal short
                    and checkpoint.complete(os.path.join(stage, name)) is None
                    for name in os.listdir(stage))
        for name in os.listdir(newest):  # a power loss tore the newest checkpoint's data
            if name.endswith(".distcp"):
                with open(os.path.join(newest, name), "r+b") as f:
                    f.truncate(64)
    assert done.wait() == 0, done.stderr.read().decode()[-2000:]
    resumed = run_cli(_tiny_run(killed, format_model_dir, image_dir, benchmark_file))
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    log = resumed.stderr.read().decode()
    assert ("skipping checkpoint" in log and ("resumed from" in log) == older) if torn \
        else "resumed from" in log, (older, log[-1500:])
    for checkpoint_dir in ("questioner_v1", "reasoner_v1"):
        a, b = (_weights(os.path.join(clean, checkpoint_dir)),
                _weights(os.path.join(killed, checkpoint_dir)))
        assert all(torch.equal(a[k], b[k]) for k in a), checkpoint_dir
    for name in ("questions_v1.jsonl", "labeled_v1.jsonl", "kept_v1.jsonl", "eval_v1.json"):
        assert (open(os.path.join(clean, name)).read()
                == open(os.path.join(killed, name)).read()), name
    # removed when done
    assert not os.path.exists(os.path.join(killed, "checkpoints", kill_when.split("/")[0]))


def test_generation_resumes_at_the_first_missing_part(tmp_path):
    """A stage split into parts that dies after writing some parts redoes only the missing ones."""
    calls = []

    def work(chunk):
        calls.append(chunk)
        if chunk == 3 and len(calls) == 4:
            raise KeyboardInterrupt  # the first attempt dies in chunk 3
        return [{"chunk": chunk, "row": r} for r in range(2)]

    out = str(tmp_path / "rows.jsonl")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.in_parts(out, 5, work)
    rows = checkpoint.in_parts(out, 5, work)
    assert calls == [0, 1, 2, 3, 3, 4]
    assert rows == [{"chunk": c, "row": r} for c in range(5) for r in range(2)]


def _parts_worker(model_dir, image_dir, benchmark_file, folder):
    from config import load_config
    from run import Run

    Run(load_config(os.path.join(ROOT, "config.yaml"),  # joins the process group
                    _tiny_run(os.path.join(folder, "run"), model_dir, image_dir, benchmark_file)
                    + ["device=cpu", "questioner.prompts_per_step=4"]))
    done = []

    def work(chunk):
        done.append(chunk)
        return [{"chunk": chunk}]

    rows = checkpoint.in_parts(os.path.join(folder, "rows.jsonl"), 6, work)
    torch.save({"done": done, "rows": rows},
               os.path.join(folder, f"parts_rank{distributed.rank()}.pt"))


def test_resumed_parts_are_split_over_ranks_by_what_is_missing(tmp_path, format_model_dir,
                                                               image_dir, benchmark_file):
    """Parts 0, 2 and 4 (what rank 0's static share would have been) survive a killed run: the
    rerun splits the missing 1, 3, 5 over both ranks (rank 0: 1 and 5, rank 1: 3), instead of rank
    0 idling at the barrier while rank 1 does all three; rank 0 returns every row in order."""
    os.makedirs(tmp_path / "rows.jsonl.parts")
    for chunk in (0, 2, 4):
        (tmp_path / "rows.jsonl.parts" / f"{chunk:06d}.jsonl").write_text(
            f'{{"chunk": {chunk}}}\n')
    spawn_two(_parts_worker, format_model_dir, image_dir, benchmark_file, str(tmp_path))
    rank0 = torch.load(tmp_path / "parts_rank0.pt")
    rank1 = torch.load(tmp_path / "parts_rank1.pt")
    assert rank0["done"] == [1, 5] and rank1["done"] == [3]
    assert rank0["rows"] == [{"chunk": c} for c in range(6)] and rank1["rows"] is None


def _unshared_worker(model_dir, image_dir, benchmark_file, folder):
    from config import ConfigError, load_config
    from run import Run

    # each rank its own folder: what two nodes see with run_dir on a local disk
    run_dir = os.path.join(folder, f"local{distributed.rank()}")
    try:
        Run(load_config(os.path.join(ROOT, "config.yaml"),
                        _tiny_run(run_dir, model_dir, image_dir, benchmark_file)
                        + ["device=cpu", "questioner.prompts_per_step=4"]))
        message = None
    except ConfigError as error:
        message = str(error)
    torch.save(message, os.path.join(folder, f"unshared_rank{distributed.rank()}.pt"))


def test_run_dir_not_shared_by_every_rank_is_refused_at_start(tmp_path, format_model_dir,
                                                              image_dir, benchmark_file):
    spawn_two(_unshared_worker, format_model_dir, image_dir, benchmark_file, str(tmp_path))
    for rank in (0, 1):  # every rank stops, with the same one-line reason
        message = torch.load(tmp_path / f"unshared_rank{rank}.pt")
        assert message is not None and message.startswith("run_dir: "), message
        assert "not shared by every process" in message
