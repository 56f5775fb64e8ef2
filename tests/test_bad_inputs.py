"""A user's mistakes end in one line, `error: KEY: what is wrong`, exit status 2, before anything
is written to run_dir, so the corrected rerun into the same run_dir proceeds. Each bad input is
made here by hand from a good one."""

import json
import logging
import os
import shutil

import pytest
from PIL import Image

import visplay
from config import load_config
from run import Run
from test_loop import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edited_model(source, folder, *, model_type=None, keep_bytes=None):
    """A copy of the model folder `source` with another model_type, or its weights cut to
    `keep_bytes` bytes."""
    shutil.copytree(source, folder)
    if model_type is not None:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["model_type"] = model_type
        with open(path, "w") as f:
            json.dump(config, f)
    if keep_bytes is not None:
        path = os.path.join(folder, "model.safetensors")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:keep_bytes(len(data))])
    return str(folder)


def refused(args, capsys):
    """Run the command line; its exit status and its stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        visplay.main(args)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


CASES = ["model_type unsupported", "model_type unknown to transformers", "weights truncated",
         "weights shorter than their header", "run_dir is a file", "run_dir not writable",
         "images is one image file", "no image readable", "no pair readable",
         "benchmark rows of unknown keys"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, tiny_model_dir,
                                                    image_dir, benchmark_file):
    run_dir = tmp_path / "run"
    model, images, key = tiny_model_dir, image_dir, None
    extra = []
    if case == "model_type unsupported":
        model, key = edited_model(tiny_model_dir, tmp_path / "m", model_type="llama"), "model.path"
    elif case == "model_type unknown to transformers":
        model = edited_model(tiny_model_dir, tmp_path / "m", model_type="frobnicator")
        key = "model.path"
    elif case == "weights truncated":
        model = edited_model(tiny_model_dir, tmp_path / "m", keep_bytes=lambda n: n // 2)
        key = "model.path"
    elif case == "weights shorter than their header":
        model = edited_model(tiny_model_dir, tmp_path / "m", keep_bytes=lambda n: 100)
        key = "model.path"
    elif case == "run_dir is a file":
        run_dir.write_text("notes")
        key = "run_dir"
    elif case == "run_dir not writable":
        run_dir, key = "/proc/visplay-test-run", "run_dir"  # no process may make folders there
    elif case == "images is one image file":
        images, key = os.path.join(image_dir, "00.png"), "data.images"
    elif case == "no image readable":
        (tmp_path / "broken").mkdir()
        for i in range(3):
            (tmp_path / "broken" / f"{i}.png").write_bytes(b"\x89PNG not an image")
        images, key = str(tmp_path / "broken"), "data.images"
    elif case == "no pair readable":
        (tmp_path / "pairs.jsonl").write_text(
            json.dumps({"original": "gone/a.png", "edited": "gone/b.png"}) + "\n")
        extra, key = ["method=vision-zero", f"spy.pairs={tmp_path / 'pairs.jsonl'}"], "spy.pairs"
    elif case == "benchmark rows of unknown keys":
        rows = [{"prompt_text": "How many?", "gold": "3", "picture": "0.png"}] * 2
        (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        extra = [f"eval.benchmarks={{mine: {tmp_path / 'bench.jsonl'}}}"]
        key = "eval.benchmarks.mine"
    overrides = tiny_overrides(str(run_dir), model, images, benchmark_file) + extra
    args = ["--config", os.path.join(ROOT, "config.yaml")]
    for override in overrides:
        args += ["--set", override]
    code, lines = refused(args, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {key}: "), lines
    if case == "run_dir is a file":
        assert run_dir.read_text() == "notes"
    else:
        assert not os.path.exists(run_dir)
    if case == "benchmark rows of unknown keys":  # what was found, and what is read
        assert "gold, picture, prompt_text" in lines[0] and "question, query, prompt" in lines[0]
    if case.startswith("model_type"):  # the family table, not transformers' upgrade advice
        assert "supported: Qwen2.5-VL (qwen2_5_vl)" in lines[0]
    if case.startswith("weights"):
        assert "model.safetensors" in lines[0]


def test_the_corrected_rerun_proceeds_in_the_same_run_dir(tmp_path, capsys, tiny_model_dir,
                                                         image_dir, benchmark_file):
    """A refused model leaves no config.yaml behind, so the rerun with the right model is not
    refused as 'a run made with model.path = <the bad one>'."""
    run_dir = str(tmp_path / "run")
    bad = edited_model(tiny_model_dir, tmp_path / "m", model_type="llama")
    args = ["--config", os.path.join(ROOT, "config.yaml")]
    for override in tiny_overrides(run_dir, bad, image_dir, benchmark_file):
        args += ["--set", override]
    assert refused(args, capsys)[0] == 2
    run = Run(load_config(os.path.join(ROOT, "config.yaml"),
                          tiny_overrides(run_dir, tiny_model_dir, image_dir, benchmark_file)))
    run.check_config()  # raises if a config.yaml of the refused start were there
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))


def test_a_pair_of_two_sizes_plays_with_one_warning(tmp_path, caplog):
    from vision_zero.rules import Game
    from vision_zero.play import readable_games

    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (112, 56), (30, 30, 200)).save(tmp_path / "b.png")
    pairs = [(str(tmp_path / "a.png"), str(tmp_path / "b.png")),
             (str(tmp_path / "a.png"), str(tmp_path / "a.png"))]
    games = [Game(0, 1, 3), Game(1, 2, 3), Game(0, 3, 3)]
    warned = set()
    with caplog.at_level(logging.WARNING, logger="visplay"):
        kept, images, skipped = readable_games(games, pairs, 784, 12544, warned=warned)
        readable_games(games, pairs, 784, 12544, warned=warned)
    assert kept == games and skipped == 0 and images[0][0].size != images[0][1].size
    assert [r.message.split(":")[0] for r in caplog.records] == ["[spy] pair 0"]  # once


def test_skipped_benchmark_rows_are_counted_in_the_evaluation(tmp_path, tiny_model_dir, image_dir,
                                                             benchmark_file):
    """Three good rows, one without an answer, one whose image is missing: eval_v0.json says
    n 3 and skipped {"missing image": 1, "no answer": 1}, as does the run's summary row."""
    from eval import evaluate_reasoner
    from summary import eval_row

    with open(benchmark_file) as f:
        rows = [json.loads(line) for line in f][:3]
    for row in rows:  # absolute image paths: the file is written elsewhere
        row["image"] = os.path.join(os.path.dirname(benchmark_file), row["image"])
    rows += [dict(rows[0], id="no-answer", answer=""), dict(rows[0], id="gone", image="gone.png")]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = str(tmp_path / "run")
    run = Run(load_config(os.path.join(ROOT, "config.yaml"),
                          tiny_overrides(run_dir, tiny_model_dir, image_dir, str(bench))
                          + ["eval.samples=0", "eval.max_new_tokens=4"]))
    evaluate_reasoner(run, 0, reasoner_path=tiny_model_dir, out_path=run.path("eval_v0.json"))
    with open(run.path("eval_v0.json")) as f:
        saved = json.load(f)["tiny"]
    assert saved["n"] == 3 and saved["skipped"] == {"missing image": 1, "no answer": 1}
    assert eval_row(run_dir, 0)["eval"]["tiny"]["skipped"] == saved["skipped"]
