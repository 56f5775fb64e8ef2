"""The vision-language model on disk: load, save, and build a tiny one offline.

VisPlay trains the model families of `families.py` (Qwen2.5-VL / Qwen2-VL, Qwen3-VL, Qwen3.5,
InternVL, Gemma 3, Gemma 4). Everything here works from local folders in `save_pretrained`
format; nothing is downloaded.

- `load_vlm(path)`: model + processor from a folder (a real checkpoint or one this project wrote),
  with the classes of its family.
- `save_vlm(model, processor, path)`: `save_pretrained` of both, atomically (`data.atomic_path`),
  so a folder that exists is always complete: the run loop resumes on that fact.
- `build_tiny_vlm(path, corpus)`: a few-million-parameter Qwen2.5-VL with its own byte-level BPE
  tokenizer trained on `corpus`, Qwen's special tokens and chat template, and the PIL image
  processor. Tests and the embedded default use it; its files load exactly like a real model's.

Why a processor subclass: `Qwen2_5_VLProcessor` also wants a video processor, which needs
torchvision (not a dependency here). `ImageProcessor` is the same processor without the video
part. `AutoProcessor` cannot find this class, so load it with `load_vlm` (or
`ImageProcessor.from_pretrained`); `families.py` has the other families' image-only processors.
"""

import os

import torch
from transformers import (
    AutoConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data import atomic_path

# Qwen2.5-VL's special tokens, in its order, so the tiny model's ids mean what a real model's do.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Tokens that only the processor may place: sampling one of them breaks the next forward pass.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>"]

# Qwen2.5-VL's chat template without the default system prompt (a real checkpoint brings its own).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images only (no video processor, hence no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def check_model_dir(path):
    """Raise FileNotFoundError, naming the folder and what it needs, unless `path` holds a
    checkpoint."""
    what = ("a local folder written by save_pretrained (config.json, *.safetensors, tokenizer and "
            "preprocessor files)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist: give {what}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {path!r} has no config.json: give {what}")


def load_vlm(path, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """Load a model of a supported family (`families.FAMILIES`) and its processor from a local
    folder.

    device="meta": the model's structure only, no weights read (`distributed.load_into_shards`
    fills a sharded one from rank 0's copy).
    """
    from families import family_of  # families.py builds on this module's Qwen pieces

    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    try:
        family = family_of(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    model_class = family.model_class
    if str(device) == "meta":
        with torch.device("meta"):
            model = model_class._from_config(config, dtype=dtype,
                                             attn_implementation=attn_implementation)
    else:
        model = model_class.from_pretrained(path, dtype=dtype,
                                            attn_implementation=attn_implementation).to(device)
    processor = family.processor_class.from_pretrained(path)
    template = processor.chat_template or processor.tokenizer.chat_template
    if template is None or processor.image_token not in template:
        # none, or one that writes another image placeholder than the one the processor expands
        # (InternVL's hub templates write <image>; its processor expands <IMG_CONTEXT>)
        template = family.chat_template
    processor.chat_template = template
    return model, processor


def save_vlm(model, processor, path, state_dict=None):
    """`save_pretrained` model and processor into `path` atomically (`data.atomic_path`).

    state_dict: the weights to write instead of the model's own (a sharded model's gathered copy).
    """
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)


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
