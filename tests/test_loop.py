"""End to end: `visplay.py` runs every stage, writes every artifact, and a rerun resumes."""

import json
import os

import pytest

import summary
import visplay
from config import ConfigError, load_config
from data import write_jsonl

ARTIFACTS = ["config.yaml", "eval_v0.json", "eval_v0_items.jsonl", "questioner_v1",
             "questions_v1.jsonl", "labeled_v1.jsonl", "kept_v1.jsonl", "reasoner_v1",
             "eval_v1.json", "eval_v1_items.jsonl", "metrics.jsonl", "summary.jsonl"]


def tiny_overrides(run_dir, model_dir, image_dir, benchmark_file):
    """Every stage at the smallest size that still exercises it."""
    return [f"run_dir={run_dir}", f"model.path={model_dir}", f"data.images={image_dir}",
            f"eval.benchmarks={{tiny: {benchmark_file}}}", "iterations=1", "model.min_pixels=784",
            "model.max_pixels=12544", "eval.max_new_tokens=12", "eval.samples=2",
            "questioner.steps=2", "questioner.prompts_per_step=2", "questioner.group_size=4",
            "questioner.updates_per_step=2", "questioner.micro_batch_size=3",
            "questioner.max_new_tokens=12", "questioner.answer_samples=3",
            "questioner.lr=1e-4",
            "generation.questions_per_image=2", "generation.max_new_tokens=12",
            "generation.batch_size=5",
            "labeling.answers_per_question=3", "labeling.max_new_tokens=12", "labeling.p_low=0.0",
            "labeling.p_high=1.0", "labeling.batch_size=7",
            "reasoner.steps=2", "reasoner.prompts_per_step=2", "reasoner.group_size=3",
            "reasoner.updates_per_step=1", "reasoner.micro_batch_size=4",
            "reasoner.max_new_tokens=12"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, format_model_dir, image_dir, benchmark_file):
    run_dir = str(tmp_path_factory.mktemp("run"))
    overrides = tiny_overrides(run_dir, format_model_dir, image_dir, benchmark_file)
    summaries = visplay.run_loop(load_config("config.yaml", overrides))
    return run_dir, overrides, summaries


def test_run_writes_every_artifact(finished_run):
    run_dir, _, summaries = finished_run
    for name in ARTIFACTS:
        assert os.path.exists(os.path.join(run_dir, name)), name
    for checkpoint in ("questioner_v1", "reasoner_v1"):
        files = os.listdir(os.path.join(run_dir, checkpoint))
        assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files
    # 12 pool images x 2 questions each; every labeled row comes from a valid question
    questions = [json.loads(line) for line in open(os.path.join(run_dir, "questions_v1.jsonl"))]
    assert len(questions) == 24 and {q["image_index"] for q in questions} == set(range(12))
    labeled = [json.loads(line) for line in open(os.path.join(run_dir, "labeled_v1.jsonl"))]
    assert len(labeled) == sum(q["valid"] for q in questions) > 0
    assert all(len(r["answers"]) == 3 for r in labeled)
    kept = [json.loads(line) for line in open(os.path.join(run_dir, "kept_v1.jsonl"))]
    # band [0, 1] keeps all voted ones
    assert kept == [r for r in labeled if r["silver_answer"] is not None]
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(m["stage"], m["step"]) for m in metrics] == [("questioner", 0), ("questioner", 1),
                                                        ("reasoner", 0), ("reasoner", 1)]
    for m in metrics:
        for key in ("reward_mean", "reward_std", "advantage_std", "clip_frac_high", "clip_frac_low",
                    "kl", "entropy", "response_length_mean", "grad_norm", "seconds_sampling",
                    "seconds_scoring", "seconds_training"):
            assert key in m, key
        if m["stage"] == "questioner":  # the share of reward-time answers without a box
            assert 0 <= m["unboxed_rate"] <= 1 and 0 <= m["invalid_rate"] <= 1
    assert [s["iteration"] for s in summaries] == [0, 1]
    assert summaries[1]["kept"] == len(kept) and summaries[1]["generated"] == 24
    assert 0 <= summaries[1]["eval"]["tiny"]["accuracy"] <= 1


def test_rerun_resumes_instead_of_starting_over(finished_run, caplog):
    run_dir, overrides, summaries = finished_run
    stamps = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in ARTIFACTS[:-2]}
    caplog.set_level("INFO", logger="visplay")
    again = visplay.run_loop(load_config("config.yaml", overrides))
    assert again == summaries
    assert {name: os.path.getmtime(os.path.join(run_dir, name))
            for name in stamps if name != "config.yaml"} == \
        {name: t for name, t in stamps.items() if name != "config.yaml"}
    assert sum("stage skipped" in r.message for r in caplog.records) == 5


def test_rerun_redoes_only_missing_stages(finished_run, caplog):
    run_dir, overrides, _ = finished_run
    import shutil
    shutil.rmtree(os.path.join(run_dir, "reasoner_v1"))
    os.remove(os.path.join(run_dir, "eval_v1.json"))
    questions_stamp = os.path.getmtime(os.path.join(run_dir, "questions_v1.jsonl"))
    caplog.set_level("INFO", logger="visplay")
    visplay.run_loop(load_config("config.yaml", overrides))
    assert os.path.exists(os.path.join(run_dir, "reasoner_v1"))
    assert os.path.getmtime(os.path.join(run_dir, "questions_v1.jsonl")) == questions_stamp
    assert sum("stage skipped" in r.message for r in caplog.records) == 3
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    # the reasoner stage ran again: its rows were replaced, not appended twice
    assert [(m["stage"], m["step"]) for m in metrics].count(("reasoner", 0)) == 1


def test_rerun_with_another_config_is_refused(finished_run):
    """One line naming the key, its old and its new value."""
    run_dir, overrides, _ = finished_run
    with pytest.raises(ConfigError) as error:
        visplay.run_loop(load_config("config.yaml", overrides + ["questioner.lr=0.5"]))
    message = str(error.value)
    assert message.startswith("questioner.lr: run_dir ") and "\n" not in message
    assert "questioner.lr = 0.0001, this config has 0.5" in message


def test_rerun_with_changed_eval_settings_is_refused_once_evaluations_exist(finished_run):
    """eval_v*.json were made with the old eval settings: accepting new ones would leave
    config.yaml describing evaluations it did not make."""
    run_dir, overrides, _ = finished_run
    with pytest.raises(ConfigError) as error:
        visplay.run_loop(load_config("config.yaml", overrides + ["eval.max_new_tokens=20"]))
    message = str(error.value)
    assert message.startswith("eval.max_new_tokens: eval_v0.json, eval_v1.json in ")
    assert "eval.max_new_tokens = 12, this config has 20" in message


def test_rerun_through_another_spelling_of_run_dir_resumes(finished_run, caplog):
    """A trailing slash (or a moved or copied run directory) is the same run."""
    run_dir, overrides, summaries = finished_run
    caplog.set_level("INFO", logger="visplay")
    again = visplay.run_loop(load_config("config.yaml", overrides + [f"run_dir={run_dir}/"]))
    assert again == summaries
    assert sum("stage skipped" in r.message for r in caplog.records) == 5
    assert any("eval_v0.json exists" in r.message for r in caplog.records)


def test_rerun_accepts_new_keys_at_their_default_and_sections_the_method_never_reads(
        finished_run, tmp_path):
    """A run made before a knob existed (its config.yaml lacks the key) resumes while the knob
    keeps config.py's default; not when the knob differs from it. A VisPlay run never reads the
    spy section, so a change there does not stop it."""
    import shutil

    import yaml

    run_dir, overrides, summaries = finished_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    with open(os.path.join(copy, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    del saved["questioner"]["shared_prefix"]   # default true, as config.yaml has it
    del saved["labeling"]["p_low_yes_no"]      # default null; config.yaml has 0.85
    with open(os.path.join(copy, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f, sort_keys=False)
    moved = overrides + [f"run_dir={copy}"]
    with pytest.raises(ConfigError, match="^labeling.p_low_yes_no: .* '<absent>', this config "
                                          "has 0.85"):
        visplay.run_loop(load_config("config.yaml", moved))
    again = visplay.run_loop(load_config("config.yaml", moved + ["labeling.p_low_yes_no=null",
                                                                "spy.lr=0.5"]))
    assert again == summaries


def test_rerun_removes_what_a_kill_left_behind_finished_stages(finished_run, caplog):
    """Kill windows, recreated by hand: between writing questions_v1.jsonl (or kept_v1.jsonl) and
    removing its parts; after an export, while its checkpoints were being deleted (a step folder
    whose meta.json is there but not its data, and a folder renamed away). The rerun skips the
    finished stages, removes all of it, and leaves no checkpoints/ folder."""
    run_dir, overrides, summaries = finished_run
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # a finished run has none
    debris = [os.path.join(run_dir, "questions_v1.jsonl.parts"),
              os.path.join(run_dir, "labeled_v1.jsonl.parts"),
              os.path.join(run_dir, "checkpoints", "reasoner_v1", "step_000002"),
              os.path.join(run_dir, "checkpoints", "questioner_v1.removed", "step_000001")]
    for folder in debris:
        os.makedirs(folder)
    with open(os.path.join(debris[0], "000000.jsonl"), "w") as f:
        f.write('{"raw": "left over"}\n')
    with open(os.path.join(debris[2], "meta.json"), "w") as f:
        f.write('{"step": 2, "world_size": 1}')
    caplog.set_level("INFO", logger="visplay")
    assert visplay.run_loop(load_config("config.yaml", overrides)) == summaries
    for folder in debris:
        assert not os.path.exists(folder), folder
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    assert sum("left by an interrupted run" in r.message for r in caplog.records) == 4


def test_thin_filter_guard_stops_before_the_reasoner_stage(
        tmp_path, format_model_dir, image_dir, benchmark_file, capsys):
    """A band that keeps nothing (p in [0, 0]: every voted question has p > 0) gives yield 0: the
    run stops in iteration 1 after its silver labels, with the reason as its last printed line;
    a rerun stops at the same place, and guard.min_yield=null (free on a rerun) goes on."""
    overrides = tiny_overrides(tmp_path, format_model_dir, image_dir, benchmark_file) + [
        "iterations=2", "labeling.p_high=0.0", "guard.min_yield=0.5", "reasoner.steps=1"]
    summaries = visplay.run_loop(load_config("config.yaml", overrides))
    labeled = [json.loads(line) for line in open(tmp_path / "labeled_v1.jsonl")]
    assert labeled and [s["iteration"] for s in summaries] == [0]
    assert (tmp_path / "kept_v1.jsonl").read_text() == ""
    assert not (tmp_path / "reasoner_v1").exists() and not (tmp_path / "eval_v1.json").exists()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"guard: stopped in iteration 1, before its reasoner stage: the filter kept 0 "
                    f"of {len(labeled)} labeled questions (yield 0.000 < guard.min_yield 0.5); "
                    "the run's last reasoner is the base (guard.min_yield=null goes on)")
    assert visplay.run_loop(load_config("config.yaml", overrides)) == summaries
    again = visplay.run_loop(load_config("config.yaml", overrides + ["guard.min_yield=null",
                                                                     "iterations=1"]))
    assert [s["iteration"] for s in again] == [0, 1] and (tmp_path / "reasoner_v1").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path, image_dir):
    cfg = load_config("config.yaml", [f"run_dir={tmp_path}", f"model.path={tmp_path / 'nope'}",
                                      f"data.images={image_dir}"])
    with pytest.raises(ConfigError, match="^model.path: .*nope"):
        visplay.run_loop(cfg)


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("questioner:\n  stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        visplay.main(["--config", str(bad)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown key questioner.stepz;"), lines


@pytest.mark.parametrize("case", ["images missing", "images empty", "manifest empty",
                                  "benchmark missing", "model missing"])
def test_bad_paths_fail_before_any_model_is_built(tmp_path, monkeypatch, image_dir, case):
    """Every path the config names is checked first: a bad one is a ConfigError naming its key,
    raised before the embedded world is built (minutes) or a model is loaded, and before the run
    directory is made."""
    import run as run_module
    from toyworld import base

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the paths were checked")

    monkeypatch.setattr(base, "build_embedded", forbidden)
    monkeypatch.setattr(run_module, "load_vlm", forbidden)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "manifest.jsonl").write_text("\n")
    overrides, key = {
        "images missing": ([f"data.images={tmp_path / 'missing'}"], "data.images"),
        "images empty": ([f"data.images={tmp_path / 'empty'}"], "data.images"),
        "manifest empty": ([f"data.images={tmp_path / 'manifest.jsonl'}"], "data.images"),
        "benchmark missing": ([f"eval.benchmarks={{mine: {tmp_path / 'absent.jsonl'}}}"],
                              "eval.benchmarks.mine"),
        "model missing": ([f"model.path={tmp_path / 'no-model'}", f"data.images={image_dir}"],
                          "model.path"),
    }[case]
    run_dir = tmp_path / "run"
    cfg = load_config("config.yaml", [f"run_dir={run_dir}"] + overrides)
    with pytest.raises(ConfigError) as error:
        visplay.run_loop(cfg)
    assert str(error.value).startswith(f"{key}: "), str(error.value)
    assert not run_dir.exists()


def test_cli_missing_image_folder_is_one_line_and_status_2(tmp_path):
    """The README's command with a missing image folder: one line on stderr, exit status 2, and no
    embedded world built (the check runs before it)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(root, "visplay.py"), "--config",
         os.path.join(root, "config.yaml"),
         "--set", f"run_dir={run_dir}", "--set", f"data.images={tmp_path / 'missing'}"],
        capture_output=True, text=True, cwd=root, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.images: "), result.stderr
    assert str(tmp_path / "missing") in lines[0]
    assert not run_dir.exists()


def test_final_table_reports_every_iteration_and_category():
    """The printed table, on two hand-written summary rows: accuracy, pass@1, majority@k, pass@k
    in %, the question statistics ('-' where the base has none), and one accuracy row per
    iteration per category."""
    rows = [{"iteration": 0, "eval": {"toy": {"accuracy": 0.5, "pass@1": 0.25, "majority@k": 0.375,
                                              "pass@k": 0.75,
                                              "by_category": {"count": 0.5, "exists": 0.5}}}},
            {"iteration": 1, "kept": 7, "kept_confidence_mean": 0.55, "invalid_rate": 0.125,
             "distinct_ratio": 0.75, "mean_pairwise_bleu": 0.2,
             "eval": {"toy": {"accuracy": 0.625, "pass@1": 0.5, "majority@k": 0.5, "pass@k": 0.875,
                              "by_category": {"count": 0.75, "exists": 0.5}}}}]
    lines = visplay.format_summary(rows).splitlines()
    assert lines[0] == ("| iteration | toy acc | pass@1 | maj@k | pass@k | kept | yield | mean p "
                        "| mean p kept | silver acc kept | invalid | distinct | pairwise BLEU |")
    assert lines[2] == "| 0 | 50.0 | 25.0 | 37.5 | 75.0 | - | - | - | - | - | - | - | - |"
    assert lines[3] == ("| 1 | 62.5 | 50.0 | 50.0 | 87.5 | 7 | - | - | 0.55 | - | 0.12 | 0.75 "
                        "| 0.20 |")
    assert lines[-3:] == ["|---|---|---|", "| 0 | 50.0 | 50.0 |", "| 1 | 75.0 | 50.0 |"]
    assert "| iteration | count | exists |" in lines


def test_each_stage_frees_its_models(tmp_path, monkeypatch, format_model_dir, image_dir,
                                     benchmark_file):
    """Every model a stage loads is gone once the stage has returned (`run.free_memory` after
    each stage), so the next stage never holds two stages' models at once."""
    import gc
    import weakref

    import run as run_module

    loaded = []  # (stage, weak reference) of every model loaded
    load_model, free_memory = run_module.Run.load_model, run_module.free_memory

    def recording_load(self, path, trainable, park=False):
        model, processor = load_model(self, path, trainable, park)
        loaded.append(weakref.ref(model))
        return model, processor

    frees = []

    def checked_free():
        free_memory()
        frees.append(len(loaded))
        alive = [ref for ref in loaded if ref() is not None]
        assert not alive, f"{len(alive)} of {len(loaded)} models still alive after a stage"

    monkeypatch.setattr(run_module.Run, "load_model", recording_load)
    monkeypatch.setattr(visplay, "free_memory", checked_free)
    gc.disable()  # only the stage's own release may collect
    try:
        visplay.run_loop(load_config("config.yaml", tiny_overrides(
            tmp_path, format_model_dir, image_dir, benchmark_file)))
    finally:
        gc.enable()
    # eval_v0, then questioner (policy, reference, frozen reasoner), generation, labeling,
    # reasoner (policy, reference), eval_v1
    assert frees == [1, 4, 5, 6, 8, 9]


def test_informative_filter_band_and_the_yes_no_floor():
    """keep_informative keeps p_low <= p <= p_high (ends included) among rows with a silver
    answer; with p_low_yes_no a yes/no answer (any case, surrounding space) needs that floor
    instead, while other answers keep p_low. Expected ids worked out by hand."""
    rows = [{"id": i, "silver_answer": a, "confidence": p} for i, (a, p) in enumerate([
        ("4", 0.3), ("4", 0.25), ("4", 0.8), ("4", 0.875),     # 0, 2 in the band
        ("yes", 0.5), ("No ", 0.75), ("no", 0.875),            # 4, 5 in the band
        (None, 0.5), ("B", 0.5)])]                             # no answer; an option letter
    ids = lambda kept: [r["id"] for r in kept]  # noqa: E731
    assert ids(visplay.keep_informative(rows, 0.3, 0.8)) == [0, 2, 4, 5, 8]
    assert ids(visplay.keep_informative(rows, 0.3, 0.8, p_low_yes_no=0.75)) == [0, 2, 5, 8]
    assert ids(visplay.keep_informative(rows, 0.3, 0.8, p_low_yes_no=0.85)) == [0, 2, 8]
    assert ids(visplay.keep_informative(rows, 0.3, 1.0, p_low_yes_no=0.85)) == [0, 2, 3, 6, 8]


def _same_outputs(run_a, run_b):
    """The two runs' files are the same: bytes, but metrics.jsonl without its seconds and
    config.yaml but its run_dir."""
    def files(root):
        return sorted(os.path.relpath(os.path.join(folder, name), root)
                      for folder, _, names in os.walk(root) for name in names)

    assert files(run_a) == files(run_b)
    for name in files(run_a):
        with open(os.path.join(run_a, name), "rb") as a, open(os.path.join(run_b, name), "rb") as b:
            if name == "config.yaml":  # the same run, only moved
                assert [line for line in a.read().splitlines() if b"run_dir" not in line] == [
                    line for line in b.read().splitlines() if b"run_dir" not in line]
            elif name == "metrics.jsonl":
                strip = [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}
                         for f in (a, b) for line in f]
                half = len(strip) // 2
                assert strip[:half] == strip[half:], name
            else:
                assert a.read() == b.read(), name


@pytest.mark.parametrize("damage", ["kept cut at a line", "questions cut mid-line",
                                    "reasoner weights cut", "metrics row torn"])
def test_a_damaged_output_is_made_again_with_one_warning(damage, finished_run, tmp_path, caplog):
    """Damage a kill cannot cause but a power loss, a full disk or an edit can: the rerun warns
    once, naming the file, redoes that stage and what follows, and ends with the undamaged run's
    files (metrics: a row cut short is dropped when its stage resumes)."""
    import shutil

    run_dir, overrides, summaries = finished_run
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    name = {"kept cut at a line": "kept_v1.jsonl", "questions cut mid-line": "questions_v1.jsonl",
            "reasoner weights cut": "reasoner_v1/model.safetensors",
            "metrics row torn": "metrics.jsonl"}[damage]
    path = os.path.join(copy, name)
    with open(path, "rb") as f:
        data = f.read()
    if damage == "kept cut at a line":
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[:len(lines) // 2])
    elif damage == "metrics row torn":  # killed in the reasoner stage, then the disk filled up
        shutil.rmtree(os.path.join(copy, "reasoner_v1"))
        for evaluation in ("eval_v1.json", "eval_v1_items.jsonl"):
            os.remove(os.path.join(copy, evaluation))
        data = data[:-len(data.splitlines()[-1]) // 2]
    else:
        data = data[:len(data) * 2 // 3]
    with open(path, "wb") as f:
        f.write(data)
    caplog.set_level("WARNING", logger="visplay")
    again = visplay.run_loop(load_config("config.yaml", overrides + [f"run_dir={copy}"]))
    assert again == summaries
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and name.split("/")[0] in warnings[0], warnings
    _same_outputs(run_dir, copy)


def test_dynamic_sampling_refills_the_reasoner_batch(tmp_path, format_model_dir, image_dir,
                                                     benchmark_file):
    """`reasoner.dynamic_sampling: 2`: each reasoner step draws questions until its batch holds
    only groups whose rewards differ, or 3 rounds were drawn; the step logs what it found."""
    overrides = tiny_overrides(str(tmp_path / "run"), format_model_dir, image_dir,
                               benchmark_file) + ["questioner.steps=0", "reasoner.steps=1",
                                                  "reasoner.dynamic_sampling=2"]
    visplay.run_loop(load_config("config.yaml", overrides))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    (step,) = [row for row in rows if row["stage"] == "reasoner"]
    assert step["sampling_rounds"] in (1, 2, 3)
    assert step["sampling_rounds"] == 3 or step["groups_kept"] == 1.0  # out of rounds, or full
    assert 0 <= step["informative_share"] <= 1 and 0 <= step["groups_kept"] <= 1
    if step["groups_kept"] > 0:  # a batch of informative groups only
        assert step["zero_advantage_groups"] == 0


def test_question_statistics_against_the_truth(tmp_path):
    """An iteration's question statistics on hand-written files, with a truth for two of its
    questions: 5 written, 1 invalid; 4 labeled (one with no majority), p 0.5 / 0.9 / 0.75; 2 kept,
    whose silver answers are right ("3") and wrong ("yes" where the truth says "no")."""
    def row(image, question, silver=None, p=None, valid=True):
        return {"image_index": image, "question": question, "valid": valid, "choices": None,
                "silver_answer": silver, "confidence": p}

    count, exists = row(0, "How many objects are there?", "3", 0.5), row(0, "Is a red?", "yes", 0.9)
    other, unsure = row(1, "What is this?", "cat", 0.75), row(1, "How many circles?", None, 0.25)
    write_jsonl(tmp_path / "questions_v1.jsonl",
                [count, exists, other, unsure, row(1, "x", valid=False)])
    write_jsonl(tmp_path / "labeled_v1.jsonl", [count, exists, other, unsure])
    write_jsonl(tmp_path / "kept_v1.jsonl", [count, exists])
    scores = {"toy": {"accuracy": 0.5, "by_category": {}}}
    (tmp_path / "eval_v1.json").write_text(json.dumps(scores))
    truth = {(0, "How many objects are there?"): ("count_total", "3"),
             (0, "Is a red?"): ("exists", "no"), (1, "How many circles?"): ("count_shape", "2")}
    s = summary.iteration_summary(str(tmp_path), 1, lambda i, q: truth.get((i, q), (None, None)))
    assert (s["generated"], s["labeled"], s["kept"], s["invalid_rate"]) == (5, 4, 2, 0.2)
    assert s["confidence_mean"] == pytest.approx((0.5 + 0.9 + 0.75) / 3)
    assert s["kept_confidence_mean"] == pytest.approx(0.7)
    assert s["silver_accuracy"] == 0.5
    assert s["family_mix"] == {"count_shape": 0.25, "count_total": 0.25, "exists": 0.25,
                               "other": 0.25}
    assert s["kept_family_mix"] == {"count_total": 0.5, "exists": 0.5}
    lines = summary.format_summary([s]).splitlines()
    assert lines[2].startswith("| 1 | 50.0 | - | - | - | 2 | 0.50 | 0.72 | 0.70 | 50.0 | 0.20 "
                               "| 1.00 | ")  # then the pairwise BLEU, tested on its own
    assert lines[-3:] == ["| iteration | count_shape | count_total | exists | other |",
                          "|---|---|---|---|---|", "| 1 | 25 / 0 | 25 / 50 | 25 / 50 | 25 / 0 |"]
    assert summary.iteration_summary(str(tmp_path), 1).get("silver_accuracy") is None
