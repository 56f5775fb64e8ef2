"""A model on disk: check a folder, load a model and its processor, save them atomically.

Everything works from local folders in `save_pretrained` format; nothing is downloaded.

- `load_vlm(path)`: model + processor from a folder (a real checkpoint or one this project wrote),
  with the classes of its family (`families.FAMILIES`).
- `save_vlm(model, processor, path)`: `save_pretrained` of both, atomically (`data.atomic_path`),
  so a folder that exists is always complete: the run loop resumes on that fact.

Processors are loaded with the family's image-only class (`families.ImageProcessor` for
Qwen2.5-VL): the stock processors also want a video processor, which needs torchvision (not a
dependency), and `AutoProcessor` cannot find the image-only classes.
"""

import os

import torch
from transformers import AutoConfig

from data import atomic_path
from models.families import family_of


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
