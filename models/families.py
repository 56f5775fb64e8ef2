"""What differs between the model families this project trains, in one table (`FAMILIES`).

Every family is a transformers `*ForConditionalGeneration` with `model.model.language_model.layers`
and an `lm_head`; the sampler (`sampler.py`), model inputs (`models/inputs.py`), the training
forward (`models/logprobs.py`), FSDP2 sharding (`distributed.py`), loading and export
(`models/load.py`) read the rest from the family's `Family`:

- positions: Qwen's multimodal rope (`model.model.get_rope_index`: image tokens get (t, h, w)
  positions, text continues after the largest) or plain 1-D positions (InternVL, Gemma);
- how images enter: `pixel_values` plus the family's own inputs (`image_grid_thw` for Qwen,
  `image_position_ids` for Gemma 4; an image-token mask for Gemma, whose image tokens attend to
  their whole image);
- tokens: which end a turn (EOS) and which only the processor may place (never sampled);
- the chat template (used when a checkpoint brings none) and the image-only processor class
  (the stock processors also want a video processor, which needs torchvision: not a dependency;
  `ImageProcessor` is Qwen2.5-VL's, a name the shipped bases' processor configs record);
- FSDP2 units (the vision blocks' path) and the parameter names `freeze_vision` freezes;
- the KV cache and how a prompt's encoding is shared by its G completions in training;
- whether the model soft-caps its logits (Gemma 4), which the training forward must repeat.

An unsupported `model_type` is refused by `family_of` with the list of supported ones.
"""

from dataclasses import dataclass

import transformers
from transformers import (
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma4ForConditionalGeneration,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

try:
    from transformers import Gemma4Processor
    GEMMA4_UNAVAILABLE = None
except ImportError:  # transformers 5.17 imports it only with torchvision (its video processor)
    Gemma4Processor = None
    GEMMA4_UNAVAILABLE = (f"transformers {transformers.__version__} imports Gemma4Processor only "
                          "with torchvision (not a dependency); the pinned transformers "
                          "(requirements.txt) does not need it")

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


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` for images only (no video processor, hence no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class InternVLImageProcessor(InternVLProcessor):
    """`InternVLProcessor` for images only (no video processor, hence no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256,
                 chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         image_seq_length=image_seq_length, chat_template=chat_template, **kwargs)


if Gemma4Processor is not None:
    class Gemma4ImageProcessor(Gemma4Processor):
        """`Gemma4Processor` for images only (no audio feature extractor, no video processor,
        hence no torchvision). Its `__init__` hands its parts to `ProcessorMixin` by keyword, so
        it is copied here without them; unlike the stock one it does not add <|video|> to the
        tokenizer. The tokenizer must still name boa_token / eoa_token: the stock input check
        refuses every call otherwise (an operator-precedence slip in transformers'
        `validate_inputs`)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
                     image_seq_length=280, audio_seq_length=750, audio_ms_per_token=40,
                     **kwargs):
            self.image_seq_length = image_seq_length
            self.image_token_id = tokenizer.image_token_id
            self.boi_token, self.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
            self.image_token = tokenizer.image_token
            self.video_token = self.video_token_id = None
            self.audio_seq_length, self.audio_ms_per_token = audio_seq_length, audio_ms_per_token
            self.audio_token_id = getattr(tokenizer, "audio_token_id", None)
            self.audio_token = getattr(tokenizer, "audio_token", None)
            self.boa_token = getattr(tokenizer, "boa_token", None)
            self.eoa_token = getattr(tokenizer, "eoa_token", None)
            ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template, **kwargs)
else:
    Gemma4ImageProcessor = None


# InternVL: Qwen's turns; the processor expands <IMG_CONTEXT> to <img> + 256 per tile + </img>.
INTERNVL_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                          "<IMG_CONTEXT>\n")
# Gemma 3: the processor expands <start_of_image> to its 256 soft tokens between image marks.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Gemma 4: the processor expands <|image|> to its soft tokens between <|image> and <image|>.
GEMMA4_TEMPLATE = (GEMMA3_TEMPLATE.replace("<start_of_turn>", "<|turn>")
                   .replace("<end_of_turn>", "<turn|>").replace("<start_of_image>", "<|image|>"))


@dataclass(frozen=True)
class Family:
    """What the sampler, the trainer, sharding and export need to know about one model family."""
    name: str                 # as docs/models.md's table of families names it
    model_class: type         # loads the checkpoint and is what `save_pretrained` exports
    processor_class: type     # image-only processor (`from_pretrained` of a checkpoint folder)
    rope: str                 # "mrope": [3, B, L] positions from get_rope_index; "1d": [B, L]
    image_inputs: tuple       # `Prompt` fields the forward takes besides pixel_values
    image_mask: str | None    # forward kwarg naming image tokens (bidirectional image attention)
    image_attention: str      # "causal"; "bidirectional": an image token sees its whole image;
    # "config": bidirectional if text_config.use_bidirectional_attention == "vision" (Gemma 4)
    softcap: bool             # the model caps its logits at text_config.final_logit_softcapping
    eos_tokens: tuple         # end a completion (with the tokenizer's eos_token)
    banned_tokens: tuple      # only the processor places them: never sampled
    chat_template: str        # for a checkpoint without one
    pixel_limits: bool        # the image processor takes min/max pixels (else: fixed tiles)
    vision_blocks: str        # under model.model: the vision blocks, one FSDP2 unit each
    vision_modules: tuple     # parameter-name parts of vision tower + projector (freeze_vision)
    cache: str                # the layers of its KV cache (transformers' DynamicCache)
    shared_prefix: str        # how G completions share one prompt encoding in training:
    # "mask": prompt + G completion slots in one sequence, a 4D mask keeps the slots apart;
    # "mask per layer type": the same with one mask per attention type (sliding window layers);
    # "prompt cache": the prompts forwarded once into a cache, each completion continuing from
    # its prompt's row (recurrent layers ignore masks: `prompt_cache.py`)
    unavailable: str | None = None  # why this transformers cannot run the family (None: it can)


QWEN_EOS = ("<|im_end|>", "<|endoftext|>")
_QWEN = dict(rope="mrope", image_inputs=("image_grid_thw",), image_mask=None,
             image_attention="causal", softcap=False, eos_tokens=QWEN_EOS,
             banned_tokens=tuple(VISION_TOKENS), chat_template=CHAT_TEMPLATE, pixel_limits=True,
             vision_blocks="visual.blocks", vision_modules=(".visual.",), cache="full attention",
             shared_prefix="mask")

FAMILIES = {
    "qwen2_5_vl": Family("Qwen2.5-VL", Qwen2_5_VLForConditionalGeneration, ImageProcessor,
                         **_QWEN),
    "qwen2_vl": Family("Qwen2-VL", Qwen2VLForConditionalGeneration, ImageProcessor, **_QWEN),
    "qwen3_vl": Family("Qwen3-VL", Qwen3VLForConditionalGeneration, Qwen3VLImageProcessor,
                       **_QWEN),
    # Qwen3.5: as Qwen3-VL, but 3 of 4 language layers are linear attention
    "qwen3_5": Family("Qwen3.5", Qwen3_5ForConditionalGeneration, Qwen3VLImageProcessor,
                      **{**_QWEN, "cache": "linear attention (recurrent state) + full attention",
                         "shared_prefix": "prompt cache"}),
    "internvl": Family(
        "InternVL", InternVLForConditionalGeneration, InternVLImageProcessor, rope="1d",
        image_inputs=(), image_mask=None, image_attention="causal", softcap=False,
        eos_tokens=QWEN_EOS,
        banned_tokens=("<img>", "</img>", "<IMG_CONTEXT>", "<video>", *VISION_TOKENS),
        chat_template=INTERNVL_TEMPLATE, pixel_limits=False,
        vision_blocks="vision_tower.encoder.layer",
        vision_modules=(".vision_tower.", ".multi_modal_projector."), cache="full attention",
        shared_prefix="mask"),
    "gemma3": Family(
        "Gemma 3", Gemma3ForConditionalGeneration, Gemma3Processor, rope="1d", image_inputs=(),
        image_mask="token_type_ids", image_attention="bidirectional", softcap=False,
        eos_tokens=("<end_of_turn>", "<eos>"),
        banned_tokens=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        chat_template=GEMMA3_TEMPLATE, pixel_limits=False,
        vision_blocks="vision_tower.encoder.layers",
        vision_modules=(".vision_tower.", ".multi_modal_projector."),
        cache="sliding window + full attention", shared_prefix="mask per layer type"),
    "gemma4": Family(
        "Gemma 4", Gemma4ForConditionalGeneration, Gemma4ImageProcessor, rope="1d",
        image_inputs=("image_position_ids",), image_mask="mm_token_type_ids",
        image_attention="config", softcap=True, eos_tokens=("<turn|>", "<eos>"),
        banned_tokens=("<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>",
                       "<|audio|>"),
        chat_template=GEMMA4_TEMPLATE, pixel_limits=False,
        vision_blocks="vision_tower.encoder.layers",
        vision_modules=(".vision_tower.", ".embed_vision."),
        cache="sliding window + full attention (+ layers reading another's KV)",
        shared_prefix="mask per layer type", unavailable=GEMMA4_UNAVAILABLE),
}


def family_of(config):
    """The `Family` of a model config (or a model); ValueError naming the supported ones."""
    config = getattr(config, "config", config)
    family = FAMILIES.get(config.model_type)
    if family is None:
        supported = ", ".join(f"{f.name} ({key})" for key, f in FAMILIES.items())
        raise ValueError(f"model_type {config.model_type!r} is not supported; supported: "
                         f"{supported}")
    if family.unavailable:
        raise ValueError(f"model_type {config.model_type!r} ({family.name}): "
                         f"{family.unavailable}")
    return family


def vision_blocks(model):
    """The vision blocks of a `*ForConditionalGeneration` (each one FSDP2 unit)."""
    return model.model.get_submodule(family_of(model).vision_blocks)


def is_vision_parameter(model, name):
    """True if parameter `name` belongs to the vision tower or its projector."""
    return any(part in f".{name}" for part in family_of(model).vision_modules)
