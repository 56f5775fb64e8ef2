"""bf16 on real models: fp32 master weights with bf16 compute, in every mode, and stage hand-offs
in fp32 (so that an update of lr 1e-6 is neither rounded away in the step nor between stages).

A weight of 0.02 has a bf16 ulp of 2^-13 = 1.2e-4: an AdamW step of lr 1e-6 is 1/120 of it, so
pure-bf16 weights keep only the updates of weights smaller than about 5e-4.
"""

import json
from contextlib import nullcontext
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import grpo
from config import ConfigError, ReasonerConfig, load_config
from models.inputs import encode_prompt, special_tokens
from models.load import load_vlm
from models.logprobs import completion_logprobs
from run import Run
from sampler import Sampling, sample


def _prompts(processor):
    colours = [(200, 30, 30), (30, 160, 60), (40, 70, 210), (230, 200, 40)]
    texts = ["How many objects are there?", "Is there a red circle?", "Count the circles.",
             "Which colour is the square?"]
    return [encode_prompt(processor, Image.new("RGB", (56, 56), colour), text)
            for colour, text in zip(colours, texts)]


def _one_step(model, prompts, sampled, rewards, tokens, autocast):
    """One train_step at the paper's lr 1e-6; returns each trainable parameter's change (fp32)."""
    cfg = ReasonerConfig(prompts_per_step=4, group_size=4, updates_per_step=1, micro_batch_size=16,
                         lr=1e-6, kl_coef=0.0, temperature=1.0)
    before = [p.detach().float().clone() for p in model.parameters()]
    optimizer = grpo.make_optimizer(model, cfg)
    learner = grpo.Learner(model, optimizer, None, tokens, autocast=autocast)
    metrics = grpo.train_step(learner, grpo.RolloutBatch(prompts, sampled, rewards), cfg)
    assert metrics["skipped_updates"] == 0
    return torch.cat([(p.detach().float() - b).flatten()
                      for p, b in zip(model.parameters(), before)])


def test_bf16_compute_step_moves_every_weight_like_fp32(tiny_model_dir):
    """The same rollout batch, one step at lr 1e-6, three ways: fp32; fp32 master weights with
    bf16 compute (`Run.autocast`); pure bf16 weights (what single-process bf16 training did).
    Mixed precision moves (nearly) every weight the fp32 step moves, in the same direction; pure
    bf16 loses almost all of them (so this test can fail)."""
    model, processor = load_vlm(tiny_model_dir)
    tokens = special_tokens(processor, model)
    prompts = _prompts(processor)
    sampled = sample(model, prompts, group_size=4, sampling=Sampling(1.0, 1.0, 0, 8),
                     tokens=tokens, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.5, 0.1,
                            0.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.8, 0.6])

    def bf16_compute():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    fp32 = _one_step(load_vlm(tiny_model_dir)[0], prompts, sampled, rewards, tokens, nullcontext)
    mixed = _one_step(load_vlm(tiny_model_dir)[0], prompts, sampled, rewards, tokens,
                      bf16_compute)
    pure = _one_step(load_vlm(tiny_model_dir, dtype=torch.bfloat16)[0], prompts, sampled, rewards,
                     tokens, nullcontext)
    moved = fp32 != 0
    assert moved.float().mean() > 0.5  # most weights get a gradient in this batch

    def kept(delta):  # share of the fp32 step's moved weights that this step moved too
        return (delta[moved] != 0).float().mean().item()

    def cosine(delta):
        return torch.nn.functional.cosine_similarity(delta, fp32, dim=0).item()

    print(f"moved: mixed {kept(mixed):.4f} pure {kept(pure):.4f}; "
          f"cosine: mixed {cosine(mixed):.4f} pure {cosine(pure):.4f}")
    assert kept(mixed) > 0.99 and cosine(mixed) > 0.9
    assert kept(pure) < 0.2


def _run(tmp_path, tiny_model_dir, image_dir, benchmark_file, *overrides):
    return Run(load_config("config.yaml", [
        f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", f"data.images={image_dir}",
        f"eval.benchmarks={{tiny: {benchmark_file}}}", "model.dtype=bfloat16", *overrides]))


def test_policy_in_fp32_frozen_in_bf16_export_in_fp32(tmp_path, tiny_model_dir, image_dir,
                                                     benchmark_file):
    """model.dtype bfloat16 in one process: the policy loads in fp32 (master weights) and computes
    under a bf16 autocast; frozen models load in bf16; a stage's export is fp32 and its
    config.json says so (a loader with dtype="auto" reads that)."""
    run = _run(tmp_path, tiny_model_dir, image_dir, benchmark_file)
    policy, processor = run.load_model(tiny_model_dir, trainable=True)
    frozen, _ = run.load_model(tiny_model_dir, trainable=False)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in policy.parameters())
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in frozen.parameters())
    with run.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    out = str(tmp_path / "exported")
    run.export(policy, processor, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float32}
    fp32_run = _run(tmp_path, tiny_model_dir, image_dir, benchmark_file, "model.dtype=float32")
    with fp32_run.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_cpu_offload_without_torchrun_is_refused(tmp_path, tiny_model_dir, image_dir,
                                                 benchmark_file):
    with pytest.raises(ConfigError, match="^model.cpu_offload: works under torchrun only"):
        _run(tmp_path, tiny_model_dir, image_dir, benchmark_file, "model.cpu_offload=true")


def test_activation_checkpointing_in_one_process_same_gradients(tmp_path, tiny_model_dir,
                                                                image_dir, benchmark_file):
    """model.activation_checkpointing works without torchrun too: the policy recomputes each
    block in backward, and the gradients equal those without it."""
    grads = {}
    for flag in (False, True):
        run = _run(tmp_path, tiny_model_dir, image_dir, benchmark_file, "model.dtype=float32",
                   f"model.activation_checkpointing={str(flag).lower()}")
        policy, processor = run.load_model(tiny_model_dir, trainable=True)
        layers = policy.model.language_model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [flag] * len(layers)
        tokens = special_tokens(processor, policy)
        prompts = _prompts(processor)
        sampled = sample(policy, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6),
                         tokens=tokens, generator=torch.Generator().manual_seed(1))
        policy.train()
        logprobs, _ = completion_logprobs(
            policy, [prompts[i] for i in sampled.prompt_index.tolist()], sampled.completion_ids,
            sampled.completion_mask, tokens=tokens)
        (logprobs * sampled.completion_mask).sum().backward()
        grads[flag] = [p.grad.clone() for p in policy.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in grads[True]) > 0
