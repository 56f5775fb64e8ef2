"""Every family of `models/families.py` other than Qwen2.5-VL (which the rest of the suite tests)
through the same code: build and load with its own classes, chat template, sampling against the
training forward and `model.generate`, the shared-prefix forward against one row per completion,
one GRPO step under 2-process FSDP2 against one process, and export. Tiny random models, fp32,
CPU.
"""

import dataclasses
import json
import math
import os

import pytest
import torch
from PIL import Image

import distributed
import tiny_families
from config import ReasonerConfig
from models.families import FAMILIES, family_of
from models.inputs import Tokens, collate, encode_prompt, special_tokens
from models.load import check_model_dir, checkpoint_activations, load_vlm, save_vlm
from models import logprobs as logprobs_module
from models.logprobs import completion_logprobs
from sampler import Rollout, Sampling, sample
from test_distributed import _full_state, spawn_two
from test_distributed import _prompts as fsdp_prompts
from test_distributed import _update as distributed_update

# qwen3_vl, qwen3_5, internvl, gemma3, gemma4: those this transformers can run
FAMILY_TYPES = [name for name in tiny_families.BUILDERS if not FAMILIES[name].unavailable]
SKIPPED = [pytest.param(name, marks=pytest.mark.skip(reason=FAMILIES[name].unavailable))
           for name in tiny_families.BUILDERS if FAMILIES[name].unavailable]


def noise_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module", params=FAMILY_TYPES + SKIPPED)
def tiny(request, tmp_path_factory):
    """(model_type, model dir, model, processor, tokens, prompts): three prompts of different
    lengths with images of three sizes (so rows are left-padded and hold different numbers of
    image tokens) and a two-image prompt."""
    path = str(tmp_path_factory.mktemp(request.param) / "model")
    tiny_families.build(request.param, path)
    model, processor = load_vlm(path)
    model.eval()
    tokens = special_tokens(processor, model)
    images = [noise_image(64, 32, 0), noise_image(96, 64, 1), noise_image(32, 32, 2)]
    texts = ["How many?", "Is there a blue square in the image?", "a"]
    prompts = [encode_prompt(processor, image, text) for image, text in zip(images, texts)]
    prompts.append(encode_prompt(processor, [noise_image(32, 64, 3), noise_image(64, 64, 4)],
                                 "Are these the same?"))
    return request.param, path, model, processor, tokens, prompts


def common_eos(tokens, count=60):
    """Many EOS ids, so rows end at different steps (and leave the decoding batch)."""
    ordinary = [i for i in range(20, 300) if i not in tokens.banned_ids][:count]
    return Tokens(tokens.pad_id, tokens.eos_ids + ordinary, tokens.banned_ids,
                  tokens.image_token_id)


def masked_max_abs(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


# ----------------------------------------------------------------------------- build and load


def test_a_family_this_transformers_cannot_run_is_refused_before_loading(tmp_path, monkeypatch):
    """A family marked unavailable (Gemma 4 on a transformers that imports its processor only
    with torchvision) is refused by the model folder check: one line naming config.json and
    why, before any weights are read."""
    monkeypatch.setitem(FAMILIES, "gemma3", dataclasses.replace(
        FAMILIES["gemma3"], unavailable="its processor needs torchvision here"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ValueError) as error:
        check_model_dir(str(tmp_path))
    assert str(error.value) == (f"{tmp_path / 'config.json'}: model_type 'gemma3' (Gemma 3): "
                                "its processor needs torchvision here")


def test_builds_and_loads_with_its_own_classes_and_renders_an_image_prompt(tiny):
    model_type, path, model, processor, tokens, prompts = tiny
    family = FAMILIES[model_type]
    assert type(model) is family.model_class and type(processor) is family.processor_class
    assert family_of(model) is family
    assert not hasattr(processor, "video_processor")  # image-only: no torchvision needed
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True, tokenize=False)
    expected = {"qwen3_vl": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                             "What?<|im_end|>\n<|im_start|>assistant\n"),
                "internvl": ("<|im_start|>user\n<IMG_CONTEXT>\nWhat?<|im_end|>\n"
                             "<|im_start|>assistant\n"),
                "gemma3": ("<bos><start_of_turn>user\n<start_of_image>What?<end_of_turn>\n"
                           "<start_of_turn>model\n")}
    expected["qwen3_5"] = expected["qwen3_vl"]
    expected["gemma4"] = "<bos><|turn>user\n<|image|>What?<turn|>\n<|turn>model\n"
    assert chat == expected[model_type]
    # the processor expanded each image to as many placeholders as the model makes features
    with torch.no_grad():
        for prompt in prompts:
            batch = collate(model, [prompt], tokens)
            features = model.model.get_image_features(
                batch["pixel_values"], **{k: batch[k] for k in family.image_inputs})
            pooled = features.pooler_output  # Qwen: a tuple, one [tokens, H] per image
            count = (sum(f.shape[0] for f in pooled) if isinstance(pooled, (list, tuple))
                     else pooled.flatten(0, -2).shape[0])
            assert int((prompt.input_ids == tokens.image_token_id).sum()) == count
    # EOS and banned ids are the family's (a Gemma tokenizer maps unknown names to <unk>)
    vocabulary = processor.tokenizer.get_vocab()
    assert set(tokens.eos_ids) >= {vocabulary[t] for t in family.eos_tokens}
    assert tokens.image_token_id in tokens.banned_ids
    unknown = processor.tokenizer.unk_token
    if unknown is not None and unknown not in family.eos_tokens + family.banned_tokens:
        assert processor.tokenizer.unk_token_id not in tokens.eos_ids + tokens.banned_ids


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    from transformers import BertConfig

    folder = str(tmp_path / "bert")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(folder)
    with pytest.raises(ValueError) as info:
        load_vlm(folder)
    message = str(info.value)
    assert "'bert'" in message and folder in message and "\n" not in message
    for key, family in FAMILIES.items():
        assert key in message and family.name in message


# ----------------------------------------------------------------------------- sampling


def test_sampled_logprobs_equal_the_training_forward(tiny):
    """Left padding, images of several sizes (two in one prompt), G = 3, rows ending at different
    steps: the log-probs recorded while sampling equal the per-row training forward's."""
    _, _, model, _, tokens, prompts = tiny
    tokens = common_eos(tokens)
    result = sample(model, prompts, group_size=3, sampling=Sampling(1.0, 1.0, 0, 10),
                    tokens=tokens, generator=torch.Generator().manual_seed(0))
    lengths = result.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows really ended at different steps
    rows = [prompts[i] for i in result.prompt_index.tolist()]
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, rows, result.completion_ids,
                                          result.completion_mask, tokens=tokens,
                                          chunk_size=4)
    assert masked_max_abs(logprobs, result.logprobs, result.completion_mask) <= 1e-5


def test_greedy_sampling_equals_generate(tiny):
    """Greedy decoding of a left-padded batch gives `model.generate`'s greedy tokens."""
    model_type, _, model, _, tokens, prompts = tiny
    result = sample(model, prompts, group_size=1, sampling=Sampling(0.0, max_new_tokens=8),
                    tokens=tokens)
    batch = collate(model, prompts, tokens)
    batch.pop("position_ids")  # generate numbers positions itself
    if FAMILIES[model_type].rope == "mrope":
        batch["mm_token_type_ids"] = (batch["input_ids"] == tokens.image_token_id).int()
    with torch.no_grad():
        out = model.generate(**batch, bad_words_ids=[[i] for i in tokens.banned_ids],
                             do_sample=False, max_new_tokens=8, eos_token_id=tokens.eos_ids,
                             pad_token_id=tokens.pad_id)
    reference = out[:, batch["input_ids"].shape[1]:]
    for row in range(len(prompts)):
        n = int(result.completion_mask[row].sum())
        assert result.completion_ids[row, :n].tolist() == reference[row, :n].tolist(), row


# ----------------------------------------------------------------------------- training forward


def test_shared_prefix_forward_equals_one_row_per_completion(tiny, monkeypatch):
    """Log-probs, entropies and every parameter's gradient of the shared-prefix training forward
    (each micro-batch packed: counted) equal the one-row-per-completion forward's (micro-batch
    cut inside a group)."""
    _, _, model, _, tokens, prompts = tiny
    packed = []

    def counted(real):
        def collate(*args, **kwargs):
            packed.append(real.__name__)
            return real(*args, **kwargs)
        return collate

    for name in ("collate_groups", "collate_prompt_cache"):
        monkeypatch.setattr(logprobs_module, name, counted(getattr(logprobs_module, name)))
    tokens = common_eos(tokens)
    result = sample(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 8),
                    tokens=tokens, generator=torch.Generator().manual_seed(3))
    rows = [prompts[i] for i in result.prompt_index.tolist()]
    mask = result.completion_mask
    cut = len(rows) // 2 + 1

    def forward_and_backward(shared):
        model.zero_grad()
        parts = []
        for piece in (slice(0, cut), slice(cut, len(rows))):
            logprobs, entropy = completion_logprobs(
                model, rows[piece], result.completion_ids[piece], mask[piece], tokens=tokens,
                chunk_size=3, with_entropy=True, shared_prefix=shared)
            (logprobs * mask[piece]).sum().backward()
            parts.append((logprobs.detach(), entropy))
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone()  # (Gemma 3: the
                 for p in model.parameters()]  # vision tower's unused last layer norm)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), grads

    per_row, shared = forward_and_backward(False), forward_and_backward(True)
    model.zero_grad()
    assert len(packed) == 2
    assert masked_max_abs(shared[0], per_row[0], mask) <= 1e-5
    assert masked_max_abs(shared[1], per_row[1], mask) <= 1e-4
    assert masked_max_abs(shared[0], result.logprobs, mask) <= 1e-5
    for a, b in zip(per_row[2], shared[2]):
        # fp32 rounding, measured on the parameter's own scale (Gemma 3's random projector gets
        # gradients of 1e7 whose small entries are sums that cancel)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 + 1e-5 * a.abs().max().item())
    assert max(g.abs().max().item() for g in shared[2]) > 0


def _update(model_dir, prompts, sampled, rewards, sharded):
    """`test_distributed._update` with one optimizer update of micro-batches of 4 (one per rank)."""
    cfg = ReasonerConfig(prompts_per_step=4, group_size=2, updates_per_step=1, micro_batch_size=4,
                         lr=1.0, grad_clip=0.05, kl_coef=0.05, temperature=1.0,
                         loss_agg="token-mean", logprob_chunk=3, shared_prefix=sharded)
    return distributed_update(model_dir, prompts, sampled, rewards, sharded, cfg=cfg)


def _update_workers(jobs):
    """Each rank: its 2 prompts' rows of each family's batch, sharded, shared-prefix forward."""
    for model_dir, folder in jobs:
        _, processor = load_vlm(model_dir)
        prompts = fsdp_prompts(processor)
        data = torch.load(os.path.join(folder, "batch.pt"))
        mine = distributed.my_part(list(range(len(prompts))))
        rows = [r for p in mine for r in range(len(data["prompt_index"]))
                if data["prompt_index"][r] == p]
        local_index = torch.tensor([mine.index(int(data["prompt_index"][r])) for r in rows])
        local = Rollout(local_index, data["completion_ids"][rows], data["completion_mask"][rows],
                        data["logprobs"][rows])
        model, metrics = _update(model_dir, [prompts[i] for i in mine], local,
                                 data["rewards"][rows], sharded=True)
        state = _full_state(model)
        if distributed.is_main():
            torch.save({"state": state, "metrics": metrics}, os.path.join(folder, "sharded.pt"))


def test_one_grpo_step_under_fsdp2_equals_one_process(tmp_path):
    """Per family, one train_step (shared-prefix forward, KL to a reference, clipped gradient)
    on 2 gloo ranks equals one process with one row per completion: every weight and the
    metrics. (As `test_distributed` tests Qwen2.5-VL; every family in one pair of processes.)"""
    jobs, expected = [], {}
    for model_type in FAMILY_TYPES:
        folder = tmp_path / model_type
        path = str(folder / "model")
        tiny_families.build(model_type, path)
        model, processor = load_vlm(path)
        tokens = special_tokens(processor, model)
        prompts = fsdp_prompts(processor)
        sampled = sample(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6),
                         tokens=tokens, generator=torch.Generator().manual_seed(0))
        rewards = torch.tensor([1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0])
        torch.save({"prompt_index": sampled.prompt_index,
                    "completion_ids": sampled.completion_ids,
                    "completion_mask": sampled.completion_mask, "logprobs": sampled.logprobs,
                    "rewards": rewards}, folder / "batch.pt")
        single, metrics = _update(path, prompts, sampled, rewards, sharded=False)
        expected[model_type] = (model.state_dict(), single.state_dict(), metrics)
        jobs.append((path, str(folder)))
    spawn_two(_update_workers, jobs)
    for model_type, (before, single, metrics) in expected.items():
        sharded = torch.load(tmp_path / model_type / "sharded.pt")
        moved = 0
        for name, value in single.items():
            assert torch.allclose(sharded["state"][name], value, atol=1e-5, rtol=0), \
                (model_type, name)
            moved += not torch.equal(value, before[name])
        assert moved > 10, model_type
        for key in ("loss", "kl", "grad_norm", "reward_mean", "entropy"):
            assert sharded["metrics"][key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-5), \
                (model_type, key)


# ----------------------------------------------------------------------------- export


def test_export_loads_back_with_the_family_class(tiny, tmp_path):
    """`save_vlm` (what a run exports) loads back with the family's own transformers class and
    processor: same weights, same ids, same logits."""
    model_type, _, model, processor, tokens, prompts = tiny
    family = FAMILIES[model_type]
    changed = family.model_class(model.config).eval()
    with torch.no_grad():
        changed.load_state_dict(model.state_dict())
        changed.lm_head.weight.mul_(1.5)  # an export of trained weights, not the build's
    save_vlm(changed, processor, str(tmp_path / "export"))
    plain = family.model_class.from_pretrained(str(tmp_path / "export")).eval()
    reprocessor = family.processor_class.from_pretrained(str(tmp_path / "export"))
    assert type(plain) is family.model_class
    for name, value in changed.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name
    image = noise_image(64, 32, 0)
    again = encode_prompt(reprocessor, image, "How many?")
    assert torch.equal(again.input_ids, prompts[0].input_ids)
    batch = collate(plain, [again], tokens)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, changed(**batch).logits)
        assert not torch.allclose(plain(**batch).logits, model(**batch).logits)
    assert os.path.isfile(tmp_path / "export" / "config.json")


# ----------------------------------------------------------------------------- the loop


def test_one_loop_iteration_on_internvl(tmp_path, image_dir, benchmark_file):
    """`visplay.run_loop`, every stage at its smallest, on a tiny InternVL (1-D positions, tiled
    images, tied lm_head): each stage writes its artifacts, the questioner takes its GRPO steps,
    and both checkpoints load back as InternVL. (An untrained model writes no parsable question,
    so the reasoner stage has no data here; `test_one_grpo_step_under_fsdp2_equals_one_process`
    trains InternVL on reasoner-style batches.)"""
    import visplay
    from config import load_config
    from conftest import tiny_corpus
    from test_loop import ARTIFACTS, tiny_overrides

    model_dir = str(tmp_path / "internvl")
    tiny_families.build("internvl", model_dir, corpus=tiny_corpus())
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(run_dir, model_dir, image_dir, benchmark_file) + [
        "eval.max_new_tokens=6", "eval.samples=1", "questioner.max_new_tokens=8",
        "generation.max_new_tokens=8"]
    visplay.run_loop(load_config("config.yaml", overrides))
    for name in ARTIFACTS:
        assert os.path.exists(os.path.join(run_dir, name)), name
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(m["stage"], m["step"]) for m in metrics][:2] == [("questioner", 0), ("questioner", 1)]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # the sampler's log-probs and the training forward's agree inside the loop too
    assert all(m["logprob_mismatch"] <= 1e-5 for m in metrics)
    for checkpoint in ("questioner_v1", "reasoner_v1"):
        model, _ = load_vlm(os.path.join(run_dir, checkpoint))
        assert type(model) is FAMILIES["internvl"].model_class


def test_a_template_writing_another_image_placeholder_is_replaced(tmp_path):
    """InternVL's hub templates write <image> for an image, which its processor does not expand:
    `load_vlm` then uses the family's template (and keeps one that writes <IMG_CONTEXT>)."""
    family = FAMILIES["internvl"]
    model, processor = tiny_families.build("internvl")
    processor.chat_template = family.chat_template.replace("<IMG_CONTEXT>", "<image>")
    save_vlm(model, processor, str(tmp_path / "hub"))
    assert load_vlm(str(tmp_path / "hub"))[1].chat_template == family.chat_template
    own = family.chat_template.replace("{% for message", "{{ 'System.' }}{% for message")
    processor.chat_template = own
    save_vlm(model, processor, str(tmp_path / "own"))
    assert load_vlm(str(tmp_path / "own"))[1].chat_template == own


@pytest.mark.parametrize("preset", ["qwen3-vl-8b", "qwen3.5-4b", "internvl3.5-8b", "gemma-3-4b"])
def test_family_presets_are_valid_configs(preset):
    """Each family's preset passes the config checks and keeps the paper's GRPO settings."""
    from config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", f"{preset}.yaml"))
    assert cfg.model.dtype == "bfloat16" and cfg.model.activation_checkpointing
    assert cfg.reasoner.group_size == cfg.questioner.group_size == 8


def test_qwen3_5_with_activation_checkpointing_trains_one_row_per_completion():
    """Checkpointed layers drop a cache (transformers recomputes them without one), so Qwen3.5's
    shared prefix through the prompts' cache falls back to one row per completion: log-probs and
    gradients equal the per-row forward without checkpointing (through the cache they would be
    computed without the prompt)."""
    model, processor = tiny_families.build("qwen3_5")
    tokens = special_tokens(processor, model)
    prompts = [encode_prompt(processor, noise_image(64, 32, 0), "How many?"),
               encode_prompt(processor, noise_image(32, 32, 1), "Is there a blue square?")]
    result = sample(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6),
                    tokens=tokens, generator=torch.Generator().manual_seed(0))
    rows = [prompts[i] for i in result.prompt_index.tolist()]

    def forward_and_backward(shared):
        model.zero_grad()
        logprobs, _ = completion_logprobs(model, rows, result.completion_ids,
                                          result.completion_mask, tokens=tokens,
                                          shared_prefix=shared)
        (logprobs * result.completion_mask).sum().backward()
        return logprobs.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                   for p in model.parameters()]

    per_row = forward_and_backward(False)
    checkpoint_activations(model)  # as run.py does
    model.train()
    checkpointed = forward_and_backward(True)
    assert masked_max_abs(checkpointed[0], per_row[0], result.completion_mask) <= 1e-5
    for a, b in zip(per_row[1], checkpointed[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 + 1e-5 * a.abs().max().item())
