"""The logging backends (tracking.py): TensorBoard's scalars, read back with its own event reader,
equal metrics.jsonl's, with no step twice or missing after a SIGKILL and a resume; W&B gets the
same rows along its own axes, once each (a recorded fake of its documented interface: reading an
offline run's .wandb file back needs W&B's service); a missing package is one line."""

import importlib.util
import json
import os
import sys
import types

import pytest

import tracking
import visplay
from config import load_config
from test_distributed import _tiny_run, run_cli, sigkill_when_written

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_after_a_sigkill_and_a_resume(
        tmp_path, format_model_dir, image_dir, benchmark_file):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra, not installed")
    run_dir = str(tmp_path / "run")
    overrides = _tiny_run(run_dir, format_model_dir, image_dir, benchmark_file) + [
        "logging.backends=[jsonl, tensorboard]"]
    killed = run_cli(overrides)
    sigkill_when_written(killed, os.path.join(run_dir, "checkpoints", "reasoner_v1",
                                              "step_000002"))
    resumed = run_cli(overrides)
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    again = run_cli(overrides)  # every stage done: the rerun must leave the series as they are
    assert again.wait() == 0, again.stderr.read().decode()[-2000:]
    rows = _rows(run_dir)
    expected = {}
    for step, row in enumerate(rows):
        for tag, value in tracking.scalars(row).items():
            expected.setdefault(tag, []).append((step, value))
    got = _scalars(os.path.join(run_dir, "tensorboard", "train"))
    assert set(got) == set(expected) and "reasoner/reward_mean" in got
    for tag, series in expected.items():
        steps = [step for step, _ in got[tag]]
        assert steps == sorted(set(steps)) == [step for step, _ in series], tag  # once each
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag
    summary = _scalars(os.path.join(run_dir, "tensorboard", "summary"))
    with open(os.path.join(run_dir, "summary.jsonl")) as f:
        summaries = [json.loads(line) for line in f]
    series = summary["summary/tiny/accuracy"]
    assert [step for step, _ in series] == [row["iteration"] for row in summaries] == [0, 1]
    assert [v for _, v in series] == pytest.approx(
        [row["eval"]["tiny"]["accuracy"] for row in summaries], rel=1e-6)


class FakeWandb(types.ModuleType):
    """W&B's documented interface (init -> run; run.define_metric, run.log, run.finish), recording
    every call."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def define_metric(self, name, **kwargs):
        self.calls.append(("define_metric", name, kwargs))

    def log(self, values, **kwargs):
        assert not kwargs, "steps go in as values (global_step), never as W&B's own step"
        self.calls.append(("log", dict(values)))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_every_row_once_along_its_own_axes(tmp_path, monkeypatch, caplog,
                                                       format_model_dir, image_dir,
                                                       benchmark_file):
    import shutil

    from test_loop import tiny_overrides

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(run_dir, format_model_dir, image_dir, benchmark_file) + [
        "logging.backends=[jsonl, wandb]"]
    cfg = load_config(os.path.join(ROOT, "config.yaml"), overrides)
    caplog.set_level("INFO", logger="visplay")
    visplay.run_loop(cfg)
    where = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[iteration")]
    # one iteration: every stage still to come is of a kind not timed yet (`time_left`, below)
    assert where == [f"[iteration 1 of 1, stage {k} of 5: {name}] time left: not measured yet"
                     for k, name in enumerate(visplay.STEP_NAMES, 1)]
    init = fake.calls[0]
    assert init[0] == "init" and init[1]["mode"] == "offline" and init[1]["resume"] == "allow"
    assert init[1]["config"]["questioner"]["lr"] == cfg.questioner.lr
    logged = [call[1] for call in fake.calls if call[0] == "log"]
    steps = [values for values in logged if "global_step" in values]
    rows = _rows(run_dir)
    assert [v["global_step"] for v in steps] == list(range(len(rows)))
    for values, row in zip(steps, rows):
        assert {k: v for k, v in values.items() if k != "global_step"} == tracking.scalars(row)
    summaries = [values for values in logged if "summary/iteration" in values]
    assert [v["summary/iteration"] for v in summaries] == [0, 1]
    assert ("define_metric", "reasoner/*", {"step_metric": "global_step"}) in fake.calls
    # the reasoner stage made again (its folder removed): only steps W&B has not had are logged
    fake.calls.clear()
    shutil.rmtree(os.path.join(run_dir, "reasoner_v1"))
    os.remove(os.path.join(run_dir, "eval_v1.json"))
    visplay.run_loop(cfg)
    assert len(_rows(run_dir)) == len(rows)  # metrics.jsonl has the stage's rows again
    assert not [call for call in fake.calls if call[0] == "log"]  # W&B had them all


def test_a_backend_without_its_package_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        visplay.main(["--config", os.path.join(ROOT, "config.yaml"),
                      "--set", f"run_dir={tmp_path / 'run'}",
                      "--set", "logging.backends=[jsonl, tensorboard]"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: logging.backends: tensorboard needs the package tensorboard")
    assert not (tmp_path / "run").exists()


def test_a_real_wandb_run_writes_its_offline_files(tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional extra, not installed")
    cfg = load_config(os.path.join(ROOT, "config.yaml"),
                      [f"run_dir={tmp_path}", "logging.backends=[jsonl, wandb]"])
    tracker = tracking.Tracker(cfg, str(tmp_path))
    tracker.log({"stage": "reasoner", "iteration": 1, "step": 0, "reward_mean": 0.5}, 0)
    tracker.log({"stage": "reasoner", "iteration": 1, "step": 1, "reward_mean": 0.75}, 1)
    tracker.close()
    files = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path / "wandb")
             for name in names if name.endswith(".wandb")]
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    assert (tmp_path / "wandb" / "last_step").read_text() == "1"


def test_time_left_from_the_stages_timed():
    durations = {"a": [60.0, 120.0], "b": [30.0]}
    # a: 90 s on average, b: 30 s; remaining a, b, c, a: 90 + 30 + 90 = 210 s = 3.5 min
    assert tracking.time_left(durations, ["a", "b", "c", "a"]) == \
        "about 3.5 min left, besides c (not timed yet)"
    assert tracking.time_left(durations, ["b"]) == "about 0.5 min left"
    assert tracking.time_left({}, ["a"]) == "time left: not measured yet"


def test_progress_bars_are_drawn_on_a_terminal_only():
    bar = tracking.progress(10, 3, "iter 1 reasoner")
    assert bar.disable and bar.n == 3  # pytest's stderr is no terminal: the log keeps its lines
    assert tracking.progress(10, 0, "x", show=False).disable


def _fixed_run(folder, accuracies, rewards):
    """A run directory by hand: summary.jsonl (one row per iteration) and metrics.jsonl."""
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.jsonl"), "w") as f:
        for i, accuracy in enumerate(accuracies):
            row = {"iteration": i, "eval": {"toy": {"accuracy": accuracy, "by_category": {
                "count": accuracy, "exists": 1.0}}}}
            if i:
                row.update(generated=8, labeled=8, kept=4, invalid_rate=0.0, distinct_ratio=0.5)
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step, reward in enumerate(rewards):
            f.write(json.dumps({"stage": ("questioner", "reasoner")[step % 2], "iteration": 1,
                                "step": step // 2, "reward_mean": reward, "kl": 0.01 * step,
                                "entropy": 1.0, "response_length_mean": 5.0}) + "\n")
    return folder


def test_plots_of_a_run_and_of_runs_compared(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra, not installed")
    import summary

    a = _fixed_run(str(tmp_path / "a"), [0.5, 0.75], [0.1, 0.5, 0.2, 0.6])
    b = _fixed_run(str(tmp_path / "b"), [0.5, 0.6, 0.7], [0.1, 0.4])
    summary.main([a, "--plot"])
    written = capsys.readouterr().out.split()
    assert written == [os.path.join(a, "plots", name)
                       for name in ("iterations.png", "questions.png", "steps.png")]
    summary.main(["--compare", a, b, "--out", str(tmp_path / "both")])
    written += capsys.readouterr().out.split()
    assert written[3:] == [str(tmp_path / "both" / "compare_iterations.png"),
                           str(tmp_path / "both" / "compare_steps.png")]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000, path


def test_plotting_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    import summary

    run = _fixed_run(str(tmp_path / "a"), [0.5], [0.1])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        summary.main([run, "--plot"])
    assert str(exit_info.value).startswith("error: plotting needs the package matplotlib")
    assert not os.path.exists(os.path.join(run, "plots"))
