"""Every knob of a VisPlay run, as typed dataclasses, loaded from YAML with `--set key=value`.

`config.yaml` documents each knob; this module only declares their types and defaults (the paper's
settings: README, "One GRPO step") and checks them. Unknown keys and bad values stop the run with a
message that starts with the key and says what is accepted.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class ModelConfig:
    path: str | None = None           # local save_pretrained folder; None: the embedded default
    dtype: str = "float32"            # float32 | bfloat16 (bfloat16 on GPUs)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    min_pixels: int = 512 * 512       # images are resized to sides multiple of 28, at least this
    max_pixels: int = 2048 * 2048     # many pixels and at most this many
    freeze_vision: bool = False       # keep the vision tower fixed during both GRPO stages
    cpu_offload: bool = False         # torchrun: sharded weights, gradients, optimizer state in CPU
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    kv_cache_gib: float | None = 16.0  # KV cache one sampling batch may hold, per process
    prefill_tokens: int | None = 32768  # padded prompt tokens per prefill forward
    decode_check_every: int = 1       # decode steps between looks for finished rows (`sampler`)


@dataclass
class DataConfig:
    images: str | None = None         # folder (recursive) or JSONL manifest; None: embedded pool
    max_images: int | None = None     # at most this many (the released code used 1000); None: all
    toy_language: str = "basic"       # embedded default only: basic | compositional (questions
                                      # of the toy world, `toyworld.world.LANGUAGES`)


@dataclass
class StageConfig:
    """GRPO settings of one role's training stage (README, steps 1 and 4, "One GRPO step")."""
    steps: int = 20                   # GRPO steps (rollout batches) per stage and iteration
    prompts_per_step: int = 512       # prompts (images or questions) per rollout batch
    group_size: int = 8               # G rollouts per prompt
    updates_per_step: int = 4         # optimizer updates per rollout batch
    micro_batch_size: int = 8         # sequences per forward/backward (gradient accumulation)
    rollout_batch_size: int = 64      # prompts prefilled together while sampling
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = 0                    # 0: off
    max_new_tokens: int = 512
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    eps_low: float = 0.2              # ratio clip 1 - eps_low
    eps_high: float = 0.3             # ratio clip 1 + eps_high ("clip higher")
    dual_clip: float = 3.0            # c of dual clip for negative advantages; 0: off
    kl_coef: float = 0.01             # k3 KL to the stage's starting weights; 0: no reference model
    loss_agg: str = "seq-mean-token-mean"  # or token-mean
    logprob_chunk: int = 256          # completion tokens per chunk of the vocabulary projection
    shared_prefix: bool = True        # training forwards encode a group's prompt once, not G times


@dataclass
class QuestionerConfig(StageConfig):
    prompts_per_step: int = 512
    max_new_tokens: int = 256
    answer_samples: int = 10          # m: frozen reasoner's answers per question -> confidence p
                                      # (sampled as labeling's: its temperature, top_p, budget)
    uncertainty_scale: float = 1.0    # 1: paper's 1 - 2|p - 1/2|; 0.5: released min(p, 1 - p)
    diversity_weight: float = 1.0     # weight of the BLEU-cluster penalty
    diversity_threshold: float = 0.5  # average-linkage distance threshold (distance = 1 - BLEU)
    invalid_reward: float = -1.0      # reward of an unparsable question


@dataclass
class ReasonerConfig(StageConfig):
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    dynamic_sampling: int = 0         # DAPO's: n > 0 drops groups whose rewards are all equal
                                      # and draws up to n more rounds of questions to refill;
                                      # 0: off (the paper)


@dataclass
class GenerationConfig:
    questions_per_image: int = 8      # k
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 64              # images per sampling batch


@dataclass
class LabelingConfig:
    answers_per_question: int = 9     # n
    temperature: float = 1.0
    top_p: float = 0.99
    max_new_tokens: int = 1024
    batch_size: int = 64              # questions per sampling batch
    p_low: float = 0.3                # informative filter: keep p_low <= p <= p_high
    p_high: float = 0.8
    p_low_yes_no: float | None = None  # p_low for yes/no silver answers; None: p_low (the paper)


@dataclass
class EvalConfig:
    # name -> labeled benchmark file; {} with the embedded default: the toy world's benchmark (and
    # "pool", its pool's questions labeled, for diagnosis)
    benchmarks: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int = 1024
    batch_size: int = 32
    max_items: int | None = None      # per benchmark; None: all
    samples: int = 0                  # k sampled answers per item for pass@1 / majority@k; 0: none


@dataclass
class GuardConfig:
    """When the loop stops before `iterations` (guard.py); may change on a rerun."""
    min_yield: float | None = 0.05    # kept / labeled below this stops an iteration before its
                                      # reasoner stage; None: never
    max_eval_drop: float | None = None  # greedy accuracy on the first benchmark this many points
                                      # below the run's best stops the run there; None: never


@dataclass
class SpyConfig(StageConfig):
    """Vision-Zero's game (method: vision-zero; docs/vision_zero.md): the paper's settings.
    prompts_per_step: games per step; group_size: sampled votes per civilian; max_new_tokens:
    a clue's budget."""
    steps: int = 100                  # updates (the paper's iterations)
    prompts_per_step: int = 16
    updates_per_step: int = 1
    lr: float = 1e-5
    kl_coef: float = 0.04
    pairs: str | None = None          # JSONL of {"original", "edited"} paths; None: toy pairs
    civilians: int = 4                # n_c (the released code: 3; its "4 players" counts the spy)
    rounds: int = 2                   # clue rounds
    vote_max_new_tokens: int = 512
    voters: str = "civilians"         # civilians (paper) | observer (released: one judge prompt)
    spy_image: str = "edited"         # edited (the twin B) | blank
    prompts: str = "paper"            # paper | compact (the embedded default's tiny model)
    difference: str = "two objects differ in shape and colour, in the same places"
    beta: float = 0.1                 # clue reward: spy vs civilians
    lam: float = 0.1                  # clue reward: a civilian's votes vs the civilians' mean
    rae_alpha: float = 0.95           # Role-Advantage Estimation EMA (the released code: 0.9)
    schedule: str = "iterative-spo"   # iterative-spo (paper) | alternate (released: every step)
    phase_mask: bool = True           # False: the released code's clue steps train votes too
    ema_rho: float = 0.95             # EMA of vote accuracy and n/a rate
    ema_debias: bool = False          # the switch reads the EMAs / (1 - rho^t) (from 0 otherwise)
    acc_up: float = 0.9               # decision -> clue when acc >= acc_up and n/a <= na_down
    na_down: float = 0.1
    err_up: float = 0.4               # clue -> decision when 1 - acc >= err_up or n/a >= na_up
    na_up: float = 0.5
    k_min: int = 5                    # updates at least in a stage before it may switch
    patience: int = 20                # a stage ends after this many updates; 0: never forced
    heldout_games: int = 0            # games on pairs training never sees, voted greedily
                                      # before and after (vision_zero/heldout.py); 0: none
    heldout_pairs: str | None = None  # their JSONL manifest; None: the embedded default's own
    warmup_steps: int = 3000          # embedded default only: the toy base learns the game's
                                      # format first (docs/vision_zero.md); 0: none


@dataclass
class LoggingConfig:
    """Where the run's numbers go besides metrics.jsonl (always written): `tracking.py`."""
    backends: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl, tensorboard, wandb
    wandb_project: str = "visplay"
    wandb_mode: str = "offline"       # offline (sync later: `wandb sync RUN/wandb/...`) | online


@dataclass
class Config:
    method: str = "visplay"           # visplay | vision-zero (the spy game, section spy)
    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"              # auto | cpu | cuda
    iterations: int = 3
    save_every: int = 5               # GRPO steps between resumable checkpoints; 0: none
    timeout_minutes: int = 60         # torchrun: how long a rank waits for the others
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    questioner: QuestionerConfig = field(default_factory=QuestionerConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    spy: SpyConfig = field(default_factory=SpyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _coerce(value, kind, key):
    """Check `value` against the annotation `kind`; return it converted (int -> float where
    allowed)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


# Keys that were removed, and what replaced them (an old config gets this instead of "unknown").
REMOVED = {
    f"questioner.{name}": f"removed: the reasoner's answers that score a question are sampled as "
                          f"labeling's are, with labeling.{name.removeprefix('answer_')} (one "
                          "budget, so p at reward time predicts p at labeling time)"
    for name in ("answer_temperature", "answer_top_p", "answer_max_new_tokens")}


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, "
                          f"got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for name in unknown:
        if prefix + name in REMOVED:
            raise ConfigError(f"{prefix}{name}: {REMOVED[prefix + name]}")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; accepted keys here: "
                          f"{', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)


def _check(cfg):
    """Value checks that types cannot express; each message names the key that is wrong."""
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"{key}: {what}")

    need(cfg.method in ("visplay", "vision-zero"), "method", "must be visplay or vision-zero")
    backends = ("jsonl", "tensorboard", "wandb")
    need(set(cfg.logging.backends) <= set(backends) and "jsonl" in cfg.logging.backends,
         "logging.backends", f"must list jsonl (metrics.jsonl is always written) and any of "
         f"{', '.join(backends[1:])}, got {cfg.logging.backends}")
    need(cfg.logging.wandb_mode in ("offline", "online"), "logging.wandb_mode",
         "must be offline or online")
    need(cfg.iterations >= 1, "iterations", "must be >= 1")
    need(cfg.save_every >= 0, "save_every", "must be >= 0 (0: no checkpoints inside a stage)")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(cfg.timeout_minutes >= 1, "timeout_minutes", "must be >= 1")
    model = cfg.model
    need(model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    need(model.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
         "model.attn_implementation", "must be sdpa, eager or flash_attention_2")
    need(model.min_pixels > 0, "model.min_pixels", "must be > 0")
    need(model.min_pixels <= model.max_pixels, "model.min_pixels",
         f"must be <= model.max_pixels ({model.max_pixels})")
    need(model.kv_cache_gib is None or model.kv_cache_gib > 0, "model.kv_cache_gib",
         "must be > 0 or null (no bound)")
    need(model.prefill_tokens is None or model.prefill_tokens >= 1, "model.prefill_tokens",
         "must be >= 1 or null (no bound)")
    need(model.decode_check_every >= 1, "model.decode_check_every", "must be >= 1")
    need(cfg.data.max_images is None or cfg.data.max_images >= 1, "data.max_images",
         "must be >= 1 or null")
    need(cfg.data.toy_language in ("basic", "compositional"), "data.toy_language",
         "must be basic or compositional")
    for role in ("questioner", "reasoner", "spy"):
        stage = getattr(cfg, role)
        need(stage.steps >= 0, f"{role}.steps",
             "must be >= 0 (0: the role is not trained, e.g. an ablation)")
        for name in ("prompts_per_step", "updates_per_step", "micro_batch_size",
                     "rollout_batch_size", "max_new_tokens", "logprob_chunk"):
            need(getattr(stage, name) >= 1, f"{role}.{name}", "must be >= 1")
        need(stage.group_size >= 2, f"{role}.group_size",
             "must be >= 2 (advantages are normalised within a group)")
        need(stage.prompts_per_step % stage.updates_per_step == 0, f"{role}.updates_per_step",
             f"must divide {role}.prompts_per_step ({stage.prompts_per_step})")
        need(stage.temperature > 0, f"{role}.temperature", "must be > 0 for GRPO rollouts")
        need(0 < stage.top_p <= 1, f"{role}.top_p", "must be in (0, 1]")
        need(stage.top_k >= 0, f"{role}.top_k", "must be >= 0 (0 turns it off)")
        need(stage.lr >= 0, f"{role}.lr", "must be >= 0")
        need(stage.weight_decay >= 0, f"{role}.weight_decay", "must be >= 0")
        need(len(stage.betas) == 2 and all(0 <= b < 1 for b in stage.betas), f"{role}.betas",
             "must be two numbers in [0, 1)")
        need(stage.grad_clip > 0, f"{role}.grad_clip", "must be > 0")
        need(stage.eps_low >= 0, f"{role}.eps_low", "must be >= 0")
        need(stage.eps_high >= 0, f"{role}.eps_high", "must be >= 0")
        need(stage.dual_clip == 0 or stage.dual_clip > 1, f"{role}.dual_clip",
             "must be 0 (off) or > 1")
        need(stage.kl_coef >= 0, f"{role}.kl_coef", "must be >= 0 (0: no reference model)")
        need(stage.loss_agg in ("token-mean", "seq-mean-token-mean"), f"{role}.loss_agg",
             "must be token-mean or seq-mean-token-mean")
    spy = cfg.spy
    need(spy.civilians >= 2, "spy.civilians", "must be >= 2 (votes compare civilians)")
    need(spy.rounds >= 1, "spy.rounds", "must be >= 1")
    need(spy.vote_max_new_tokens >= 1, "spy.vote_max_new_tokens", "must be >= 1")
    for key, allowed in (("voters", ("civilians", "observer")), ("spy_image", ("edited", "blank")),
                         ("prompts", ("paper", "compact")),
                         ("schedule", ("iterative-spo", "alternate"))):
        need(getattr(spy, key) in allowed, f"spy.{key}", f"must be {' or '.join(allowed)}")
    for key in ("rae_alpha", "ema_rho", "acc_up", "na_down", "err_up", "na_up"):
        need(0 <= getattr(spy, key) <= 1, f"spy.{key}", "must be in [0, 1]")
    need(spy.beta >= 0 and spy.lam >= 0, "spy.beta", "spy.beta and spy.lam must be >= 0")
    need(spy.k_min >= 1, "spy.k_min", "must be >= 1")
    need(spy.patience >= 0, "spy.patience", "must be >= 0 (0: a stage is never forced to end)")
    need(spy.warmup_steps >= 0, "spy.warmup_steps", "must be >= 0")
    need(spy.heldout_games >= 0, "spy.heldout_games", "must be >= 0 (0: no held-out games)")
    questioner = cfg.questioner
    need(questioner.answer_samples >= 1, "questioner.answer_samples", "must be >= 1")
    need(questioner.diversity_weight >= 0, "questioner.diversity_weight", "must be >= 0")
    need(cfg.reasoner.dynamic_sampling >= 0, "reasoner.dynamic_sampling",
         "must be >= 0 (0: off; n: at most n more rounds of questions per step)")
    need(0 < questioner.diversity_threshold <= 1, "questioner.diversity_threshold",
         "must be in (0, 1]")
    generation = cfg.generation
    need(generation.questions_per_image >= 1, "generation.questions_per_image", "must be >= 1")
    need(generation.temperature > 0, "generation.temperature", "must be > 0")
    need(0 < generation.top_p <= 1, "generation.top_p", "must be in (0, 1]")
    need(generation.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    need(generation.batch_size >= 1, "generation.batch_size", "must be >= 1")
    labeling = cfg.labeling
    need(labeling.answers_per_question >= 1, "labeling.answers_per_question", "must be >= 1")
    need(labeling.temperature > 0, "labeling.temperature", "must be > 0")
    need(0 < labeling.top_p <= 1, "labeling.top_p", "must be in (0, 1]")
    need(labeling.max_new_tokens >= 1, "labeling.max_new_tokens", "must be >= 1")
    need(labeling.batch_size >= 1, "labeling.batch_size", "must be >= 1")
    need(0 <= labeling.p_low <= 1, "labeling.p_low", "must be in [0, 1]")
    need(0 <= labeling.p_high <= 1, "labeling.p_high", "must be in [0, 1]")
    need(labeling.p_low <= labeling.p_high, "labeling.p_low",
         f"must be <= labeling.p_high ({labeling.p_high})")
    need(labeling.p_low_yes_no is None or 0 <= labeling.p_low_yes_no <= 1,
         "labeling.p_low_yes_no", "must be in [0, 1] or null")
    need(cfg.guard.min_yield is None or 0 <= cfg.guard.min_yield <= 1, "guard.min_yield",
         "must be in [0, 1] or null (never stop)")
    need(cfg.guard.max_eval_drop is None or cfg.guard.max_eval_drop >= 0, "guard.max_eval_drop",
         "must be >= 0 (points) or null (never stop)")
    evaluation = cfg.eval
    need(evaluation.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    need(evaluation.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(evaluation.max_items is None or evaluation.max_items >= 1, "eval.max_items",
         "must be >= 1 or null")
    need(evaluation.samples >= 0, "eval.samples", "must be >= 0 (0: greedy only)")
    return cfg


def first_difference(old, new, prefix="", defaults=None):
    """(dotted key, old value, new value) of the first leaf where two config dicts differ. With
    `defaults` (a config dict of config.py's defaults), a key the old config lacks is no
    difference while the new one holds its default: a knob added to the project since, whose
    default is what the old code did."""
    defaults = defaults or {}
    for key in list(new) + [k for k in old if k not in new]:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.", defaults.get(key))
            if found is not None:
                return found
        elif a != b and not (key not in old and key in defaults and b == defaults[key]):
            return f"{prefix}{key}", a, b
    return None


# The sections a method never reads: a rerun of its run directory may change them.
UNREAD = {"visplay": ("spy",),
          "vision-zero": ("questioner", "reasoner", "generation", "labeling", "guard")}


def parse_override(text):
    """'questioner.lr=1e-5' -> (['questioner', 'lr'], 1e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. questioner.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: "
                          f"{' '.join(str(error).split())}") from None
    return key.strip().split("."), value


def load_config(path=None, overrides=()):
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    data = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
        except yaml.YAMLError as error:
            where = " ".join(str(error).split())  # one line: the problem and its line, column
            raise ConfigError(f"{path}: not valid YAML: {where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return _check(_build(Config, data, ""))


def config_to_dict(cfg):
    """The resolved config as plain data (what the run directory's config.yaml holds)."""
    return dataclasses.asdict(cfg)
