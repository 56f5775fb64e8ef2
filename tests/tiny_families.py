"""Tiny random models of every family in `models/families.py`, with their own tokenizer and
image-only processor, built offline in well under a second (hidden size 64, 2 layers, a 300-token
BPE).

`build(model_type, path=None)` returns (model, processor); with `path` both are saved there
(`load.save_vlm`), so `load.load_vlm` loads them as it loads a real checkpoint. Image geometry is
shrunk with the models: Qwen3-VL and Qwen3.5 keep patch 16 x merge 2 (sides multiples of 32);
InternVL's tiles are 56 px (4 tokens each, up to 4 tiles + thumbnail); Gemma 3's one 32 px tile
gives 4 tokens, and its sliding window (4 tokens) is shorter than every prompt.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Gemma3Config, Gemma3ImageProcessorPil, Gemma4Config,
                          Gemma4ImageProcessorPil, GotOcr2ImageProcessorPil,
                          InternVLConfig, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil,
                          Qwen3_5Config, Qwen3VLConfig)

from models.families import FAMILIES
from models.load import save_vlm

CORPUS = ["Look at the image and ask one question about it.", "The answer is 42.",
          "How many red circles are there?", "Is there a blue square?", "\\boxed{3}",
          "user assistant model system", "Think step by step."] * 4

QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
INTERNVL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
            "<video>"]
GEMMA4 = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>",
          "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
GEMMA = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
         "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


def tokenizer(special, corpus, vocab_size=300, **kwargs):
    """A byte-level BPE trained on `corpus`, `special` tokens first (as `tiny.train_tokenizer`)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs)


def _qwen_tokenizer(corpus):
    return tokenizer(QWEN, corpus, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    extra_special_tokens={"image_token": "<|image_pad|>",
                                          "video_token": "<|video_pad|>",
                                          "vision_start_token": "<|vision_start|>",
                                          "vision_end_token": "<|vision_end|>"})


def _qwen3_parts(tok):
    """Qwen3-VL and Qwen3.5's image processor (patch 16 x merge 2) and vision config."""
    images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                      min_pixels=32 * 32, max_pixels=32 * 32 * 16)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=64)
    ids = tok.convert_tokens_to_ids
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"))
    return images, vision, tokens


def _qwen3_vl(corpus):
    tok = _qwen_tokenizer(corpus)
    images, vision, tokens = _qwen3_parts(tok)
    config = Qwen3VLConfig(
        text_config=dict(**TEXT, vocab_size=len(tok), head_dim=16, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(**vision, deepstack_visual_indexes=[0]), **tokens,
        tie_word_embeddings=False)
    return config, dict(image_processor=images, tokenizer=tok)


def _qwen3_5(corpus):
    """Layer 0 linear attention (recurrent state), layer 1 full attention."""
    tok = _qwen_tokenizer(corpus)
    images, vision, tokens = _qwen3_parts(tok)
    text = dict(**TEXT, vocab_size=len(tok), head_dim=16, pad_token_id=tok.pad_token_id,
                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    config = Qwen3_5Config(
        text_config=text, vision_config=vision, **tokens, tie_word_embeddings=False)
    return config, dict(image_processor=images, tokenizer=tok)


def _internvl(corpus):
    tok = tokenizer(INTERNVL, corpus, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>",
                                          "video_token": "<video>"})
    images = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True,
                                      min_patches=1, max_patches=4)
    config = InternVLConfig(
        text_config=dict(**TEXT, model_type="qwen2", vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
        downsample_ratio=0.5)
    return config, dict(image_processor=images, tokenizer=tok, image_seq_length=4)


def _gemma3(corpus):
    tok = tokenizer(GEMMA, corpus, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                    unk_token="<unk>",
                    extra_special_tokens={"boi_token": "<start_of_image>",
                                          "eoi_token": "<end_of_image>",
                                          "image_token": "<image_soft_token>"})
    ids = tok.convert_tokens_to_ids
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    config = Gemma3Config(
        text_config=dict(**TEXT, vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    return config, dict(image_processor=images, tokenizer=tok, image_seq_length=4)


def _gemma4(corpus):
    """4 layers (sliding, full, sliding, full), the last 2 reading the first 2's KV (their cache
    layers hold nothing); image tokens attend to their whole image; logits soft-capped at 3."""
    tok = tokenizer(GEMMA4, corpus, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                    unk_token="<unk>",
                    extra_special_tokens={"boi_token": "<|image>", "eoi_token": "<image|>",
                                          "image_token": "<|image|>", "audio_token": "<|audio|>",
                                          "boa_token": "<|audio>", "eoa_token": "<audio|>"})
    ids = tok.convert_tokens_to_ids
    images = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    config = Gemma4Config(
        text_config=dict(**{**TEXT, "num_hidden_layers": 4}, vocab_size=len(tok), head_dim=16,
                         global_head_dim=16, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tok),
                         num_kv_shared_layers=2, use_bidirectional_attention="vision",
                         final_logit_softcapping=3.0, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                           patch_size=4, pooling_kernel_size=3, position_embedding_size=64),
        audio_config=None, boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"),
        image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        audio_token_id=ids("<|audio|>"), boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"))
    return config, dict(image_processor=images, tokenizer=tok)


BUILDERS = {"qwen3_vl": _qwen3_vl, "qwen3_5": _qwen3_5,
            "internvl": _internvl, "gemma3": _gemma3, "gemma4": _gemma4}


def build(model_type, path=None, *, corpus=CORPUS, seed=0):
    """A tiny random model of `model_type` and its processor (saved to `path` when given)."""
    config, parts = BUILDERS[model_type](corpus)
    family = FAMILIES[model_type]
    processor = family.processor_class(**parts, chat_template=family.chat_template)
    torch.manual_seed(seed)
    model = family.model_class(config).float().eval()
    vocabulary = processor.tokenizer.get_vocab()
    model.generation_config.eos_token_id = [vocabulary[t] for t in family.eos_tokens
                                            if t in vocabulary]
    if path is not None:
        save_vlm(model, processor, path)
    return model, processor
