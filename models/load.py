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

import json
import os
from types import SimpleNamespace

import torch
from transformers import AutoConfig

from data import atomic_path
from models.families import family_of


WHAT = ("a local folder written by save_pretrained (config.json, *.safetensors, tokenizer and "
        "preprocessor files)")


def check_model_dir(path):
    """Check a checkpoint folder without loading it: FileNotFoundError or ValueError naming the
    file and what is wrong, unless `path` holds a config.json of a supported family
    (`families.family_of`) and whole safetensors files (`check_safetensors`). Reads config.json
    and the safetensors headers only: seconds before any model is built."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist: give {WHAT}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"model folder {path!r} has no config.json: give {WHAT}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_path}: not a readable JSON file ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    try:
        family_of(SimpleNamespace(model_type=model_type))
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    for name in weight_files(path):
        check_safetensors(os.path.join(path, name))


def weight_files(path):
    """The safetensors files of a checkpoint folder: model.safetensors, or the shards its
    model.safetensors.index.json names. FileNotFoundError when there are none (or a shard is
    missing)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index}: not a readable weight index ({error!r})") from None
    else:
        names = ["model.safetensors"]
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"model folder {path!r} has no {name}: give {WHAT}")
    return names


def check_safetensors(path):
    """ValueError naming the file unless it is a whole safetensors file: an 8-byte header
    length, a JSON header, and as many bytes after it as the header's tensors end at (a copy cut
    short, or a download stopped midway, fails here rather than deep inside the loader)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ValueError(f"{path}: not a whole safetensors file ({size} bytes, too short for "
                             "its own header): copy or save the checkpoint again")
        try:
            header = json.loads(f.read(length))
            end = max([0] + [tensor["data_offsets"][1] for name, tensor in header.items()
                             if name != "__metadata__"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not readable): "
                             "copy or save the checkpoint again") from None
    if 8 + length + end > size:
        raise ValueError(f"{path}: truncated: its tensors need {8 + length + end} bytes, the file "
                         f"holds {size}; copy or save the checkpoint again")


def load_vlm(path, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """Load a model of a supported family (`families.FAMILIES`) and its processor from a local
    folder.

    device="meta": the model's structure only, no weights read (`distributed.load_into_shards`
    fills a sharded one from rank 0's copy).
    """
    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    family = family_of(config)  # (check_model_dir refused any other model_type, naming the file)
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


def checkpoint_activations(model):
    """Recompute each block's activations in backward instead of keeping them (non-reentrant
    `torch.utils.checkpoint`): transformers' `activation_checkpointing_enable`, or
    `gradient_checkpointing_enable` where it has the older name only (transformers 5.17)."""
    enable = (getattr(model, "activation_checkpointing_enable", None)
              or model.gradient_checkpointing_enable)
    enable({"use_reentrant": False})


def save_vlm(model, processor, path, state_dict=None):
    """`save_pretrained` model and processor into `path` atomically (`data.atomic_path`).

    state_dict: the weights to write instead of the model's own (a sharded model's gathered copy).
    """
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
