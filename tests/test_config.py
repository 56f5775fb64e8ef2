"""Tests of config.py: defaults, the repository's config.yaml, type / value checks, overrides."""

import dataclasses
import os
import re
import typing

import pytest
import yaml

from config import (
    Config,
    ConfigError,
    QuestionerConfig,
    ReasonerConfig,
    StageConfig,
    config_to_dict,
    load_config,
)

REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "config.yaml")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------
# defaults and the repository file


def test_defaults_are_paper_settings():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    for stage in (cfg.questioner, cfg.reasoner):
        assert stage.eps_low == 0.2
        assert stage.eps_high == 0.3
        assert stage.dual_clip == 3.0
        assert stage.kl_coef == 0.01
        assert stage.lr == 1e-6
        assert stage.group_size == 8
        assert stage.loss_agg == "seq-mean-token-mean"
        assert stage.betas == [0.9, 0.999]
    assert isinstance(cfg.questioner, QuestionerConfig) and isinstance(cfg.reasoner, ReasonerConfig)
    assert cfg.labeling.p_low == 0.3 and cfg.labeling.p_high == 0.8
    assert cfg.labeling.answers_per_question == 9
    assert cfg.generation.questions_per_image == 8
    assert cfg.questioner.answer_samples == 10
    assert cfg.questioner.uncertainty_scale == 1.0
    assert cfg.reasoner.accuracy_weight == 0.9 and cfg.reasoner.format_weight == 0.1
    assert cfg.model.path is None and cfg.data.images is None and cfg.eval.benchmarks == {}
    assert cfg.iterations == 3
    # None means exactly the dataclass defaults
    assert cfg == Config()


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == Config()


def _dataclass_keys(cls, prefix=""):
    """All field paths of a config dataclass, recursing into nested dataclasses."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _dataclass_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def _yaml_leaves(data, prefix=""):
    """(path, value) of every leaf of the YAML sections (a mapping under a section key is a leaf
    only where the dataclass field is itself a mapping, e.g. eval.benchmarks)."""
    out = {}
    sections = {f.name for f in dataclasses.fields(Config)
                if dataclasses.is_dataclass(typing.get_type_hints(Config)[f.name])}
    for key, value in data.items():
        if prefix == "" and key in sections:
            assert isinstance(value, dict), f"section {key} is not a mapping"
            out.update(_yaml_leaves(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def test_repo_config_yaml_documents_every_knob_and_only_knobs():
    with open(REPO_CONFIG) as f:
        data = yaml.safe_load(f)
    in_yaml = set(_yaml_leaves(data))
    in_code = _dataclass_keys(Config)
    assert in_yaml - in_code == set(), "keys in config.yaml that the dataclasses do not have"
    assert in_code - in_yaml == set(), "dataclass fields that config.yaml does not document"


def test_repo_config_yaml_loads_with_its_values():
    cfg = load_config(REPO_CONFIG)
    with open(REPO_CONFIG) as f:
        data = yaml.safe_load(f)
    for key, value in _yaml_leaves(data).items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    # every float field holds a float, even where the YAML wrote an int
    for section in (cfg.questioner, cfg.reasoner):
        for f in dataclasses.fields(section):
            if typing.get_type_hints(type(section))[f.name] is float:
                assert type(getattr(section, f.name)) is float, f.name


def test_config_to_dict_round_trips(tmp_path):
    cfg = load_config(REPO_CONFIG)
    path = write(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg


# ----------------------------------------------------------------------------
# unknown keys, wrong types, bad values


@pytest.mark.parametrize("text, key", [
    ("sead: 1\n", "sead"),
    ("questioner:\n  lrr: 0.1\n", "questioner.lrr"),
    ("model:\n  freeze_vison: true\n", "model.freeze_vison"),
    ("eval:\n  benchmark: {}\n", "eval.benchmark"),
    ("reasoner:\n  answer_samples: 3\n", "reasoner.answer_samples"),  # a questioner-only knob
])
def test_unknown_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("questioner:\n  steps: ten\n", "questioner.steps"),
    ('questioner:\n  steps: "10"\n', "questioner.steps"),
    ("model:\n  freeze_vision: 1\n", "model.freeze_vision"),
    ("questioner:\n  steps: true\n", "questioner.steps"),
    ("questioner:\n  steps: 2.5\n", "questioner.steps"),
    ("reasoner:\n  lr: fast\n", "reasoner.lr"),
    ("reasoner:\n  lr: false\n", "reasoner.lr"),
    ("reasoner:\n  betas: 0.9\n", "reasoner.betas"),
    ("reasoner:\n  betas: [0.9, x]\n", "reasoner.betas[1]"),
    ("eval:\n  benchmarks: [a.jsonl]\n", "eval.benchmarks"),
    ("eval:\n  benchmarks: {mmmu: 3}\n", "eval.benchmarks.mmmu"),
    ("data:\n  max_images: many\n", "data.max_images"),
    ("model:\n  path: 3\n", "model.path"),
    ("model: 3\n", "model"),
    ("seed: null\n", "seed"),
])
def test_wrong_type(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("labeling:\n  p_low: 0.9\n", "labeling.p_low"),           # p_high stays 0.8
    ("labeling:\n  p_high: 1.5\n", "labeling.p_high"),
    ("labeling:\n  p_low_yes_no: -0.1\n", "labeling.p_low_yes_no"),
    ("questioner:\n  group_size: 1\n", "questioner.group_size"),
    ("reasoner:\n  group_size: 0\n", "reasoner.group_size"),
    ("reasoner:\n  loss_agg: foo\n", "reasoner.loss_agg"),
    ("questioner:\n  prompts_per_step: 16\n  updates_per_step: 3\n", "questioner.updates_per_step"),
    ("questioner:\n  steps: -1\n", "questioner.steps"),
    ("questioner:\n  top_p: 0.0\n", "questioner.top_p"),
    ("questioner:\n  temperature: 0\n", "questioner.temperature"),
    ("reasoner:\n  dual_clip: 1.0\n", "reasoner.dual_clip"),
    ("reasoner:\n  betas: [0.9]\n", "reasoner.betas"),
    ("model:\n  dtype: float16\n", "model.dtype"),
    ("model:\n  min_pixels: 20000\n  max_pixels: 10000\n", "model.min_pixels"),
    ("model:\n  decode_check_every: 0\n", "model.decode_check_every"),
    ("device: gpu\n", "device"),
    ("iterations: 0\n", "iterations"),
    ("data:\n  max_images: 0\n", "data.max_images"),
    ("data:\n  toy_language: spatial\n", "data.toy_language"),
    ("guard:\n  min_yield: 1.5\n", "guard.min_yield"),
    ("guard:\n  max_eval_drop: -1\n", "guard.max_eval_drop"),
    # each of these was once reported under another key (kl_coef, eps_low, answer_temperature,
    # labeling.*): the message must start with the key that is wrong
    ("questioner:\n  lr: -1.0e-5\n", "questioner.lr"),
    ("reasoner:\n  grad_clip: 0\n", "reasoner.grad_clip"),
    ("reasoner:\n  kl_coef: -0.1\n", "reasoner.kl_coef"),
    ("questioner:\n  eps_high: -0.3\n", "questioner.eps_high"),
    ("labeling:\n  temperature: 0\n", "labeling.temperature"),
    ("generation:\n  temperature: 0\n", "generation.temperature"),
    ("generation:\n  top_p: 0\n", "generation.top_p"),
    ("generation:\n  questions_per_image: 0\n", "generation.questions_per_image"),
    ("labeling:\n  top_p: 2\n", "labeling.top_p"),
    # keys that were not checked at all
    ("reasoner:\n  weight_decay: -1\n", "reasoner.weight_decay"),
    ("questioner:\n  diversity_weight: -1\n", "questioner.diversity_weight"),
    ("generation:\n  batch_size: 0\n", "generation.batch_size"),
    ("labeling:\n  max_new_tokens: 0\n", "labeling.max_new_tokens"),
    ("eval:\n  samples: -1\n", "eval.samples"),
    ("eval:\n  max_items: 0\n", "eval.max_items"),
    ("eval:\n  batch_size: 0\n", "eval.batch_size"),
    ("model:\n  attn_implementation: flash\n", "model.attn_implementation"),
])
def test_bad_value(tmp_path, text, key):
    """The message starts with the key that is wrong (not merely mentions it)."""
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert str(error.value).startswith(f"{key}: "), str(error.value)


def test_values_at_the_limits_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "labeling:\n  p_low: 0.8\n  p_high: 0.8\n"
                                      "questioner:\n  group_size: 2\n"
                                      "  prompts_per_step: 16\n  updates_per_step: 16\n"
                                      "reasoner:\n  dual_clip: 0\n"))
    assert cfg.labeling.p_low == cfg.labeling.p_high == 0.8
    assert cfg.questioner.group_size == 2 and cfg.questioner.updates_per_step == 16
    assert cfg.reasoner.dual_clip == 0.0


def test_int_accepted_for_float_field(tmp_path):
    cfg = load_config(write(tmp_path, "questioner:\n  lr: 1\n  temperature: 2\n"
                                      "reasoner:\n  betas: [0, 0.5]\n"))
    assert cfg.questioner.lr == 1.0 and type(cfg.questioner.lr) is float
    assert cfg.questioner.temperature == 2.0 and type(cfg.questioner.temperature) is float
    assert cfg.reasoner.betas == [0.0, 0.5] and all(type(b) is float for b in cfg.reasoner.betas)


def test_optional_fields_accept_null_and_values(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  path: /ckpt\ndata:\n  max_images: 5\n"
                                      "eval:\n  max_items: null\n"))
    assert cfg.model.path == "/ckpt" and cfg.data.max_images == 5 and cfg.eval.max_items is None


# ----------------------------------------------------------------------------
# overrides


def test_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, "model:\n  path: /some/ckpt\nquestioner:\n  steps: 4\n")
    cfg = load_config(path, ["questioner.lr=3.0e-5", "eval.benchmarks={a: b.jsonl}",
                             "model.path=null", "questioner.steps=7", "run_dir=runs/try=2",
                             " seed = 5 ", "reasoner.betas=[0.8, 0.9]"])
    assert cfg.questioner.lr == 3e-5 and type(cfg.questioner.lr) is float
    assert cfg.eval.benchmarks == {"a": "b.jsonl"}
    assert cfg.model.path is None
    assert cfg.questioner.steps == 7
    assert cfg.run_dir == "runs/try=2"  # only the first '=' splits
    assert cfg.seed == 5
    assert cfg.reasoner.betas == [0.8, 0.9]
    # untouched keys keep the file's / defaults' values
    assert cfg.reasoner.steps == StageConfig.steps and cfg.questioner.group_size == 8


def test_overrides_without_file_and_later_wins():
    cfg = load_config(None, ["questioner.steps=3", "questioner.steps=5",
                             "model.freeze_vision=true"])
    assert cfg.questioner.steps == 5 and cfg.model.freeze_vision is True


def test_override_exponent_without_dot_is_a_float():
    cfg = load_config(None, ["questioner.lr=1e-5", "reasoner.lr=3e-5"])
    assert cfg.questioner.lr == 1e-5 and cfg.reasoner.lr == 3e-5


def test_override_without_equals(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("questioner.lr")):
        load_config(None, ["questioner.lr"])


@pytest.mark.parametrize("override, key", [
    ("questioner.lrr=0.1", "questioner.lrr"),
    ("questioner.steps=ten", "questioner.steps"),
    ("labeling.p_low=0.95", "labeling.p_low"),
    ("nosuch.section.key=1", "nosuch"),
])
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_override_into_a_non_section(tmp_path):
    path = write(tmp_path, "seed: 3\n")
    with pytest.raises(ConfigError, match="seed"):
        load_config(path, ["seed.x=1"])


# ----------------------------------------------------------------------------
# files


def test_malformed_yaml_names_file(tmp_path):
    path = write(tmp_path, "questioner:\n  steps: [1, 2\n  lr: 0.1\n", name="broken.yaml")
    with pytest.raises(ConfigError, match=re.escape(path)):
        load_config(path)


def test_malformed_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "questioner:\n  steps: [1, 2\n  lr: 0.1\n", name="broken.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "\n" not in str(error.value) and "line" in str(error.value)


def test_override_whose_value_is_not_yaml():
    with pytest.raises(ConfigError, match=re.escape("questioner.lr")):
        load_config(None, ["questioner.lr=[1e-5"])


def test_section_given_a_value_names_the_section(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "model: 3\n"))
    assert str(error.value).startswith("model: "), str(error.value)


def test_top_level_not_a_mapping_names_file(tmp_path):
    path = write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError, match=re.escape(path)):
        load_config(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=re.escape(path)):
        load_config(path)


@pytest.mark.parametrize("key, replacement", [
    ("answer_max_new_tokens", "labeling.max_new_tokens"),
    ("answer_temperature", "labeling.temperature"),
    ("answer_top_p", "labeling.top_p"),
])
def test_removed_key_names_its_replacement(tmp_path, key, replacement):
    """The reward-time votes are sampled as labeling's: an old config that still sets its own
    budget is told which key replaced it, not just that the key is unknown."""
    path = tmp_path / "old.yaml"
    path.write_text(f"questioner:\n  {key}: 512\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value).startswith(f"questioner.{key}: removed")
    assert replacement in str(error.value)
