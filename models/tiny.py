"""A tiny Qwen2.5-VL built offline: tests and the embedded default's base start from one.

`build_tiny_vlm(path, corpus)`: a few-million-parameter Qwen2.5-VL with its own byte-level BPE
tokenizer trained on `corpus`, Qwen's special tokens and chat template, and the PIL image
processor, saved with `save_pretrained`; its files load exactly like a real model's (`load_vlm`).
"""

import torch
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.families import CHAT_TEMPLATE, ImageProcessor
from models.load import save_vlm

# Qwen2.5-VL's special tokens, in its order, so the tiny model's ids mean what a real model's do.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


def train_tokenizer(corpus, vocab_size=512, extra_tokens=()):
    """A byte-level BPE tokenizer trained on `corpus` (list of str), with Qwen's special tokens.

    Byte-level means any text can be encoded, so prompts a test writes never hit an unknown token.
    Merges may cross spaces (no word pre-split), so the world's frequent phrases become single
    tokens and prompts stay short on CPU; digits are always single tokens, so numbers stay
    compositional. `extra_tokens`: words that are always one token each (ordinary, not special:
    decoding keeps them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def tiny_config(tokenizer, *, hidden_size=64, layers=2, heads=4, kv_heads=2, vision_hidden=32,
                vision_depth=2):
    """A Qwen2.5-VL config a few million parameters big, with real Qwen geometry (patch 14,
    merge 2)."""
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // heads
    third = head_dim // 2 // 3  # mrope splits head_dim/2 rotary frequencies over (t, h, w)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head_dim // 2 - 2 * third, third, third]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
            num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)


def build_tiny_vlm(path, corpus, *, seed=0, vocab_size=512, min_pixels=28 * 28,
                   max_pixels=28 * 28 * 16, extra_tokens=(), **sizes):
    """Build a randomly initialised tiny Qwen2.5-VL + tokenizer + processor and save them to `path`.

    `sizes` go to `tiny_config` (hidden_size, layers, heads, kv_heads, vision_hidden, vision_depth).
    Returns (model, processor). Deterministic given `seed` and `corpus`.
    """
    tokenizer = train_tokenizer(corpus, vocab_size, extra_tokens)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = ImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **sizes)).float()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t)
                                            for t in ("<|im_end|>", "<|endoftext|>")]
    save_vlm(model, processor, path)
    return model, processor
