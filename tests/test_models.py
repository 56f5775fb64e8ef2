"""Tests of models/load.py and models/tiny.py: building, saving and loading the tiny Qwen2.5-VL,
and its tokenizer."""

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, BertConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import tiny_corpus
from models.families import VISION_TOKENS
from models.load import load_vlm, save_vlm
from models.tiny import SPECIAL_TOKENS, build_tiny_vlm
from roles import reasoner_prompt
from toyworld.world import render_shapes

SMALL_CORPUS = ["How many red circles are there?", "Is there a blue square?", "\\boxed{3}",
                "<type>numerical</type><question>How many?</question><answer>2</answer>"] * 5
TEXTS = ["How many red circles are there?",
         "Think step by step, then give the final answer in \\boxed{}.",
         "héllo wörld — 世界 🙂\n\ttabs  and  double spaces ",
         "<type>numerical</type><answer>12</answer>", "", " ", "\\boxed{-3.5}"]


def _state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, processor = load_vlm(tiny_model_dir)
    return model.eval(), processor


# ----------------------------------------------------------------------------
# build / save / load


def test_build_then_load_round_trip(tmp_path):
    path = str(tmp_path / "m")
    model, processor = build_tiny_vlm(path, SMALL_CORPUS, seed=3, vocab_size=300)
    loaded_model, loaded_processor = load_vlm(path)
    assert isinstance(loaded_model, Qwen2_5_VLForConditionalGeneration)
    _state_dicts_equal(model, loaded_model)
    for text in TEXTS:
        assert processor.tokenizer.encode(text) == loaded_processor.tokenizer.encode(text)
    assert len(processor.tokenizer) == len(loaded_processor.tokenizer) == 300
    assert loaded_processor.chat_template == processor.chat_template
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no .tmp / .old left


def test_build_is_deterministic(tiny_model_dir, tmp_path, loaded):
    # the same corpus, seed and sizes as conftest's fixture give the same weights and tokenizer
    model, processor = build_tiny_vlm(str(tmp_path / "again"), tiny_corpus(), seed=0,
                                      vocab_size=400, min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    _state_dicts_equal(model, loaded[0])
    for text in TEXTS:
        assert processor.tokenizer.encode(text) == loaded[1].tokenizer.encode(text)
    # and another seed gives other weights
    other, _ = build_tiny_vlm(str(tmp_path / "other"), tiny_corpus(), seed=1, vocab_size=400)
    assert not torch.equal(other.state_dict()["lm_head.weight"],
                           model.state_dict()["lm_head.weight"])


def test_saved_folder_loads_with_plain_transformers(tiny_model_dir, loaded):
    model, processor = loaded
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    _state_dicts_equal(plain, model)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS:
        assert tokenizer.encode(text) == processor.tokenizer.encode(text)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                        "What is it?<|im_end|>\n<|im_start|>assistant\n")

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_model_dir)
    assert image_processor.patch_size == 14 and image_processor.merge_size == 2
    assert image_processor.temporal_patch_size == 2
    assert (image_processor.size["shortest_edge"] == 28 * 28
            and image_processor.size["longest_edge"] == 28 * 28 * 16)
    # 84x56 image: grid (1, 56/14, 84/14) = (1, 4, 6), 24 patches
    out = image_processor(images=[Image.new("RGB", (84, 56), (200, 10, 10))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["pixel_values"].shape == (24, 3 * 2 * 14 * 14)


def test_plain_and_load_vlm_models_give_the_same_forward(tiny_model_dir, loaded):
    model, processor = loaded
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    image = render_shapes([("circle", "red", 0, 0, 0.8), ("triangle", "green", 1, 1, 0.8)],
                          rows=2, cols=3)
    prompt = reasoner_prompt(processor, image, "How many red circles are there?")
    inputs = dict(input_ids=prompt.input_ids[None],
                  attention_mask=torch.ones_like(prompt.input_ids)[None],
                  pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    with torch.no_grad():
        a = model(**inputs).logits
        b = plain(**inputs).logits
        other = reasoner_prompt(processor, Image.new("RGB", (84, 56), (0, 0, 0)),
                                "How many red circles are there?")
        c = plain(**{**inputs, "pixel_values": other.pixel_values}).logits
    assert a.shape == (1, prompt.input_ids.numel(), len(processor.tokenizer))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the image reaches the logits, so the comparison is not vacuous
    assert not torch.allclose(b, c)


def test_load_vlm_missing_folder(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_vlm(missing)


def test_load_vlm_folder_without_config(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        load_vlm(str(folder))


def test_load_vlm_unsupported_model_type(tmp_path):
    folder = str(tmp_path / "bert")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(folder)
    assert json.load(open(os.path.join(folder, "config.json")))["model_type"] == "bert"
    with pytest.raises(ValueError, match="model_type 'bert'") as info:
        load_vlm(folder)
    assert folder in str(info.value)


def test_save_vlm_replaces_existing_folder(tmp_path, loaded):
    model, processor = loaded
    path = str(tmp_path / "ckpt")
    save_vlm(model, processor, path)
    with open(os.path.join(path, "stale.txt"), "w") as f:
        f.write("from an older save")
    changed = Qwen2_5_VLForConditionalGeneration(model.config).eval()
    with torch.no_grad():
        changed.load_state_dict(model.state_dict())
        changed.lm_head.weight.add_(1.0)
    save_vlm(changed, processor, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no ckpt.tmp, no ckpt.old
    assert "stale.txt" not in os.listdir(path)  # replaced, not merged
    reloaded, reprocessor = load_vlm(path)
    _state_dicts_equal(reloaded, changed)
    assert reprocessor.tokenizer.encode(TEXTS[2]) == processor.tokenizer.encode(TEXTS[2])


class _CrashingModel:
    """Writes part of a checkpoint, then fails (a crash or a full disk mid-save)."""

    def save_pretrained(self, path, state_dict=None):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write('{"model_type": "qwen2_5_vl", "trunc')
        raise RuntimeError("disk full")


def test_save_vlm_failure_leaves_previous_folder_intact(tmp_path, loaded):
    model, processor = loaded
    path = str(tmp_path / "ckpt")
    save_vlm(model, processor, path)
    before = {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    with pytest.raises(RuntimeError, match="disk full"):
        save_vlm(_CrashingModel(), processor, path)
    after = {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    assert after == before
    reloaded, _ = load_vlm(path)
    _state_dicts_equal(reloaded, model)
    # the next successful save clears the half-written temporary folder
    save_vlm(model, processor, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_vlm_failure_with_no_previous_folder_leaves_nothing_at_path(tmp_path, loaded):
    path = str(tmp_path / "fresh")
    with pytest.raises(RuntimeError):
        save_vlm(_CrashingModel(), loaded[1], path)
    assert not os.path.exists(path)  # a folder at `path` always means a complete checkpoint


def test_save_vlm_over_existing_folder_with_trailing_slash(tmp_path, loaded):
    model, processor = loaded
    path = str(tmp_path / "ckpt")
    save_vlm(model, processor, path)
    save_vlm(model, processor, path + "/")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    load_vlm(path)


# ----------------------------------------------------------------------------
# tokenizer


def test_digits_are_single_tokens(loaded):
    tok = loaded[1].tokenizer
    assert tok.tokenize("12") == ["1", "2"]
    assert len(tok.encode("2024")) == 4
    for token in tok.tokenize("there are 12 red circles and 305 squares, 0.75 of 1000"):
        text = tok.convert_tokens_to_string([token])
        assert not any(ch.isdigit() for ch in text) or (len(text) == 1 and text.isdigit()), token
    # the corpus is full of digits yet no merged token holds one
    for token, _ in tok.get_vocab().items():
        if token not in SPECIAL_TOKENS:
            text = tok.convert_tokens_to_string([token])
            assert not any(ch.isdigit() for ch in text) or len(text) == 1, token


@pytest.mark.parametrize("text", TEXTS + ["ünïcödé ∑ ∫ ≤ 😀👍🏽",
                                          "日本語のテキスト", "\x00\x7f\r\n", "a" * 300,
                                          "Ω" + "\u0301" + "ẞ"])
def test_encode_decode_round_trip(loaded, text):
    tok = loaded[1].tokenizer
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(loaded):
    tok = loaded[1].tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert ids == sorted(ids)  # Qwen's order
    assert tok.unk_token_id not in ids or tok.unk_token_id is None
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(token) == [token_id]
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.decode([token_id]) == token
    # inside text, a special token is still one id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids_in_text = tok.encode("the answer is 3<|im_end|>\n")
    assert ids_in_text.count(im_end) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_vision_tokens():
    assert set(VISION_TOKENS) == {"<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                  "<|image_pad|>", "<|video_pad|>"}
    assert set(VISION_TOKENS) <= set(SPECIAL_TOKENS)


def test_model_config_points_at_the_tokenizer_ids(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    eos = model.generation_config.eos_token_id
    assert set(eos) == {tok.convert_tokens_to_ids("<|im_end|>"),
                        tok.convert_tokens_to_ids("<|endoftext|>")}


def test_saved_folder_copy_is_self_contained(tiny_model_dir, tmp_path):
    # a checkpoint folder moved elsewhere still loads (no absolute paths inside it)
    copy = str(tmp_path / "moved")
    shutil.copytree(tiny_model_dir, copy)
    model, processor = load_vlm(copy)
    assert (processor.tokenizer.encode("12")
            == [processor.tokenizer.convert_tokens_to_ids(d) for d in "12"])
