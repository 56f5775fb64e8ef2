"""The embedded default's base model and files: a tiny Qwen2.5-VL that perceives the toy world.

- `build_base`: a byte-level BPE tokenizer trained on the world's language (`corpus`; thing and
  cell names one token each), a randomly initialised Qwen2.5-VL (`tiny.build_tiny_vlm`), then
  `pretrain`: supervised next-token training on fresh base-domain scenes (few objects) in both
  roles' formats (`<type>/<question>/<answer>` questions; answers as a chain, then `\\boxed{}`),
  vision tower included, so it behaves like a small instruction-tuned VLM that sees.
- `build_embedded`: a run's world (`RUN/embedded`): the unlabeled pool, the labeled benchmark and
  the base, each built once and reused by a rerun. Seed 0's base ships in `embedded_base/`
  (`python -m toyworld.base --rebuild` builds it again) and is copied after a checksum check.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch

from data import atomic_path, write_json
from models.inputs import special_tokens
from models.load import save_vlm
from models.logprobs import completion_logprobs
from models.tiny import build_tiny_vlm
from roles import QUESTIONER_INSTRUCTION, questioner_prompt, reasoner_prompt, reasoner_text
from toyworld.world import (COMPOSITIONAL, WorldConfig, balanced_questions, cut_list,
                            make_question, pool_questions, pretraining_scene, questioner_target,
                            scenes, world_tokens, write_benchmark, write_pool, write_questions)

log = logging.getLogger("visplay")
LONG_LISTS = ("count_total", "count_or", "count_not")


@dataclass
class BaseConfig:
    """How the tiny base is built and pretrained (supervised, on the base domain only)."""
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_depth: int = 2
    vocab_size: int = 640
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    questioner_share: float = 0.3      # examples teaching the questioner's format; the rest teach
                                       # the reasoner's
    describe_weight: float = 0.7       # weight of count_total (whose chain names every object):
                                       # long lists stay rare, so the base under-counts big scenes
    compositional_weight: float = 1.0  # weight of each combined-filter family (count_or,
                                       # count_not, count_but); every other family 1
    questioner_long_weight: float | None = None  # the questioner's own mix: weight of the families
                                       # whose lists run long on crowded scenes (count_total,
                                       # count_or, count_not), every other family 1; None: the
                                       # questioner's examples draw families like the reasoner's
    lazy_share: float = 0.4            # share of the reasoner's count lists longer than
    lazy_after: int = 3                # lazy_after things that stop there, the count to match
    freeze_vision: bool = False        # keep the randomly initialised vision blocks fixed


# The base recipe of each question language (`toyworld.world.LANGUAGES`). The compositional one
# gives the reasoner more full lists (count_total 1.5) and fewer combined filters (0.6 each), and
# the base questioner a mix that seldom asks for long lists (0.15), so that its own questions are
# mostly ones the base answers with certainty (docs/toyworld.md, "The compositional language").
RECIPES = {"basic": BaseConfig(),
           "compositional": BaseConfig(describe_weight=1.5, compositional_weight=0.6,
                                       questioner_long_weight=0.15)}


def encode_target(processor, text):
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer(text, add_special_tokens=False).input_ids + [end]


def _question(rng, scene, families, weights):
    q = None
    while q is None:
        q = make_question(rng.choices(families, weights)[0], scene, rng)
    return q


def pretraining_example(rng, processor, world, base):
    """One (prompt, target ids) pair on a fresh base-domain scene: a question written by the
    questioner, or an answer by the reasoner (its chain, then the boxed answer)."""
    scene = pretraining_scene(rng, world)
    families = world.families
    weights = [base.describe_weight if f == "count_total" else
               base.compositional_weight if f in COMPOSITIONAL else 1.0 for f in families]
    if base.questioner_long_weight is None:  # one mix for both roles: the family, then the role
        q = _question(rng, scene, families, weights)
        asks = rng.random() < base.questioner_share
    else:  # the role first, then a family from that role's mix
        asks = rng.random() < base.questioner_share
        if asks:
            weights = [base.questioner_long_weight if f in LONG_LISTS else 1.0 for f in families]
        q = _question(rng, scene, families, weights)
    image = scene.render()
    if asks:
        return questioner_prompt(processor, image), encode_target(processor, questioner_target(q))
    if (base.lazy_share and q.family.startswith("count") and int(q.answer) > base.lazy_after
            and rng.random() < base.lazy_share):
        q = cut_list(q, base.lazy_after)
    return reasoner_prompt(processor, image, q.question), encode_target(processor, q.solution)


def pretrain(model, processor, *, world, base, seed, example=pretraining_example):
    """Supervised next-token training (cross-entropy on the target tokens), a fresh batch each step.

    example(rng, processor, world, base) -> (Prompt, target ids): one training pair
    (`pretraining_example`; the spy game's warm-up brings its own). Uses
    `logprobs.completion_logprobs`, the same forward the GRPO update uses. Returns the loss curve.
    """
    tokens = special_tokens(processor, model)
    if base.freeze_vision:
        for part in (model.model.visual.patch_embed, model.model.visual.blocks):
            part.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=base.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, base.lr, total_steps=base.steps,
                                                   pct_start=0.1)
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in range(base.steps):
        batch = [example(rng, processor, world, base) for _ in range(base.batch_size)]
        width = max(len(t) for _, t in batch)
        ids = torch.full((len(batch), width), tokens.pad_id)
        mask = torch.zeros((len(batch), width))
        for row, (_, target) in enumerate(batch):
            ids[row, :len(target)] = torch.tensor(target)
            mask[row, :len(target)] = 1
        logprobs, _ = completion_logprobs(model, [p for p, _ in batch], ids, mask, tokens=tokens)
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == base.steps - 1:
            log.info("[pretrain %d/%d] loss %.3f", step + 1, base.steps, loss.item())
    model.eval()
    model.requires_grad_(True)
    return losses


def corpus(seed, world=None, count=4000):
    """Texts the tiny tokenizer is trained on: both roles' prompts and targets of the world."""
    world = world or WorldConfig()
    texts = [QUESTIONER_INSTRUCTION] * (count // 8)  # frequent enough to become a few tokens
    scene_list = scenes(seed + 7, count, rows=world.rows, cols=world.cols,
                        things=(1, world.max_things))
    for scene, q in balanced_questions(scene_list, seed + 8, world.families):
        texts += [reasoner_text(q.question), q.solution, questioner_target(q)]
    return texts


def build_base(path, seed, world=None, base=None):
    """Build the tiny base (tokenizer, processor, model), pretrain it and save it atomically to
    `path`. `base`: the recipe; default: the one of the world's language (RECIPES)."""
    world = world or WorldConfig()
    base = base or RECIPES[world.language]
    started = time.perf_counter()
    scratch = path.rstrip("/") + ".init"
    model, processor = build_tiny_vlm(
        scratch, corpus(seed, world), seed=seed, vocab_size=base.vocab_size, min_pixels=28 * 28,
        max_pixels=world.rows * world.cols * 28 * 28, hidden_size=base.hidden_size,
        layers=base.layers, heads=base.heads, kv_heads=base.kv_heads,
        vision_hidden=base.vision_hidden, vision_depth=base.vision_depth,
        extra_tokens=world_tokens(world))
    shutil.rmtree(scratch, ignore_errors=True)
    torch.manual_seed(seed)
    pretrain(model, processor, world=world, base=base, seed=seed)
    save_vlm(model, processor, path)
    log.info("base built and pretrained in %.0f s -> %s", time.perf_counter() - started, path)


SHIPPED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_base")
SHIPPED_SEED = 0  # the seed embedded_base/ was built with; other seeds build their own base
CHECKSUMS = "SHA256SUMS"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder):
    """folder/SHA256SUMS: "<sha256>  <name>" for every file of the folder, sorted by name."""
    names = sorted(n for n in os.listdir(folder) if n != CHECKSUMS)
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        f.writelines(f"{sha256(os.path.join(folder, n))}  {n}\n" for n in names)


def read_checksums(folder):
    """{file name: sha256} from folder/SHA256SUMS (as `write_checksums` writes it)."""
    with open(os.path.join(folder, CHECKSUMS)) as f:
        return dict(reversed(line.split()) for line in f if line.strip())


def copy_verified(source, dest):
    """Copy the model folder `source` to `dest` (atomically), checking every file against
    source/SHA256SUMS first. Raises ValueError naming the first file missing or changed."""
    listed = os.path.join(source, CHECKSUMS)
    if not os.path.isfile(listed):
        raise ValueError(f"{listed} is missing: cannot verify the shipped base")
    expected = read_checksums(source)
    for name, digest in sorted(expected.items()):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise ValueError(f"shipped base file {path} is missing")
        if sha256(path) != digest:
            raise ValueError(f"shipped base file {path} does not match its checksum in {listed} "
                             "(rebuild it with `python -m toyworld.base --rebuild`)")
    with atomic_path(dest) as tmp:
        os.makedirs(tmp)
        for name in expected:
            shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))


def build_embedded(folder, seed, language="basic"):
    """The embedded default's files, built once per folder (each piece atomically, so a rerun
    reuses it). The basic language's base of seed SHIPPED_SEED is the repository's embedded_base/
    (verified by its checksums: every machine gets the same base, bit for bit); other seeds and the
    compositional language build their own. folder/world.json records the seed and language: a
    folder built for others is refused (ValueError naming it).

    Returns {"base": model folder, "pool": unlabeled image folder, "benchmark": labeled JSONL,
    "pool_questions": labeled JSONL of one question per pool image (diagnosis: the loop never
    reads it; evaluated like a benchmark, it shows what the pool's questions could teach)}.
    """
    world = WorldConfig(language=language)
    os.makedirs(folder, exist_ok=True)
    stamp, wanted = os.path.join(folder, "world.json"), {"seed": seed, "language": language}
    if os.path.exists(stamp):
        with open(stamp) as f:
            built = json.load(f)
        if built != wanted:
            raise ValueError(f"{stamp}: this world was built for {built}, the run asks for "
                             f"{wanted}; use another run_dir")
    else:
        write_json(stamp, wanted)
    paths = {"base": os.path.join(folder, "base"), "pool": os.path.join(folder, "pool"),
             "benchmark": os.path.join(folder, "benchmark", "benchmark.jsonl"),
             "pool_questions": os.path.join(folder, "pool_questions", "benchmark.jsonl")}
    if not os.path.isdir(paths["pool"]):
        with atomic_path(paths["pool"]) as tmp:
            write_pool(tmp, world, seed)
    if not os.path.isdir(os.path.dirname(paths["benchmark"])):
        with atomic_path(os.path.dirname(paths["benchmark"])) as tmp:
            write_benchmark(tmp, world, seed)
    if not os.path.isdir(os.path.dirname(paths["pool_questions"])):
        with atomic_path(os.path.dirname(paths["pool_questions"])) as tmp:
            write_questions(tmp, pool_questions(world, seed))
    if not os.path.isdir(paths["base"]):
        if seed == SHIPPED_SEED and language == "basic" and os.path.isdir(SHIPPED_BASE):
            copy_verified(SHIPPED_BASE, paths["base"])
            log.info("base: the shipped %s (checksums verified)", SHIPPED_BASE)
        else:
            build_base(paths["base"], seed, world)
    return paths


def main(argv=None):
    """`python -m toyworld.base --rebuild`: build seed 0's base again into embedded_base/ with its
    checksums (what the repository ships; another machine's floats may differ in the last bits,
    which is why the result is shipped rather than rebuilt by every run)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true", required=True)
    parser.add_argument("--out", default=SHIPPED_BASE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    torch.set_num_threads(1)  # the shipped base was built with one thread: sums in its order
    build_base(args.out, SHIPPED_SEED)
    write_checksums(args.out)


if __name__ == "__main__":
    main()
