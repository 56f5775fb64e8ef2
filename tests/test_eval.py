"""Tests of eval.py: benchmark files in every supported layout, graded end to end.

Fixture files are written here (tiny PNGs, on disk and as base64), with bad rows of each kind. The
model's answers are fixed texts returned by a stub of `eval.generate`, the model boundary: image
loading, prompts (real tiny processor), extraction, grading, summaries and the table run for real,
so every expected value below is worked out by hand. One run uses the real sampler and tiny model.
"""

import base64
import http.server
import io
import json
import os
import threading
from dataclasses import replace

import pytest
import torch
from PIL import Image

import benchmark_files
import eval as evaluation
from data import read_jsonl, write_jsonl
from models.inputs import special_tokens
from models.load import load_vlm
from models.logprobs import completion_logprobs
from roles import reasoner_prompt
from sampler import Limits, Sampling, rollout

SETTING = evaluation.EvalSetting(min_pixels=28 * 28, max_pixels=28 * 28 * 16)


def png(color, size=(56, 56)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(color, prefix=False):
    text = base64.b64encode(png(color)).decode()
    return f"data:image/png;base64,{text}" if prefix else text


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_vlm(tiny_model_dir)


@pytest.fixture
def folder(tmp_path):
    """A benchmark folder with img/red.png, img/blue.png, images/green.png and a corrupt
    img/broken.png."""
    os.makedirs(tmp_path / "img")
    os.makedirs(tmp_path / "images")
    (tmp_path / "img" / "red.png").write_bytes(png("red"))
    (tmp_path / "img" / "blue.png").write_bytes(png("blue", (84, 56)))
    (tmp_path / "images" / "green.png").write_bytes(png("green"))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)
    return str(path)


class Stub:
    """Stands in for `eval.generate`: the response to a prompt is the text of the first key (a piece
    of question text) found in the decoded prompt; per checkpoint (folder name) when `by_model`."""

    def __init__(self, responses, by_model=False):
        self.responses, self.by_model, self.prompts = responses, by_model, []

    def __call__(self, model, processor, prompts, group_size, sampling, tokens, limits,
                 generator=None):
        responses = (self.responses[os.path.basename(model.name_or_path)] if self.by_model
                     else self.responses)
        texts = []
        for prompt in prompts:
            self.prompts.append(prompt)
            decoded = processor.tokenizer.decode(prompt.input_ids)
            matches = [text for key, text in responses.items() if key in decoded]
            assert matches, f"no stub response for prompt {decoded!r}"
            texts += [matches[0]] * group_size
        return texts


def run(tiny, monkeypatch, path, responses, **kwargs):
    model, processor = tiny
    stub = Stub(responses)
    monkeypatch.setattr(evaluation, "generate", stub)
    report = {}
    items = benchmark_files.load_benchmark(path, report=report)
    results = evaluation.evaluate(model, processor, items, replace(SETTING, batch_size=3),
                                  progress=False, **kwargs)
    return items, results, report, stub


def graded(results):
    return [(r["id"], r["extracted"], r["correct"]) for r in results]


# ----------------------------------------------------------------------------
# Layouts


def test_native_jsonl_with_bad_rows(tiny, monkeypatch, folder):
    rows = [
        {"id": "n1", "image": "img/red.png", "question": "What color is it?",
         "choices": ["red", "blue"], "answer": "A", "category": "color"},
        {"id": "n2", "image": "img/blue.png", "question": "How many cells?", "answer": "12",
         "category": "count"},
        {"id": "n3", "image": ["img/red.png", "img/blue.png"], "question": "Same color in both?",
         "answer": "no", "category": "color"},
        {"id": "n4", "image": "green.png", "question": "What share is green?", "answer": "50%",
         "answer_type": "percentage", "category": "count"},  # found under images/
        {"id": "bad1", "image": "img/missing.png", "question": "Q?", "answer": "1"},
        {"id": "bad2", "image": "img/broken.png", "question": "Q?", "answer": "1"},
        {"id": "bad3", "image": "img/red.png", "question": "  ", "answer": "1"},
        {"id": "bad4", "image": "img/red.png", "question": "Q?", "answer": ""},
        {"id": "bad5", "image": "img/red.png", "question": "Q?", "choices": ["red", "blue"],
         "answer": "C"},
        {"id": "bad6", "question": "Q?", "answer": "1"},
    ]
    path = str(folder / "bench.jsonl")
    write_jsonl(path, rows)
    responses = {"What color": "It is red.\n(A)",
                 "How many cells": "There are 1.2 dozen... \\boxed{12}",
                 "Same color": "Yes, both are red.", "What share": "The answer is 0.5."}
    items, results, report, stub = run(tiny, monkeypatch, path, responses)
    assert [i.answer_type for i in items] == ["multiple_choice", "integer", "yes_no", "percentage"]
    assert items[2].images == [str(folder / "img" / "red.png"), str(folder / "img" / "blue.png")]
    assert items[3].images == [str(folder / "images" / "green.png")]
    assert report == {"path": path, "layout": "native", "rows": 10, "items": 4,
                      "bad": {"answer not an option": 1, "empty question": 1, "missing image": 2,
                              "no answer": 1, "unreadable image": 1}}
    assert graded(results) == [("n1", "A", True), ("n2", "12", True),
                               ("n3", "Yes, both are red.", False), ("n4", "0.5", True)]
    # the two-image item got two images, in order, and the options were listed under the question
    assert [len(p.image_grid_thw) for p in stub.prompts] == [1, 1, 2, 1]
    summary = evaluation.summarize(results)
    assert summary["n"] == 4 and summary["accuracy"] == 0.75
    assert ({c: s["accuracy"] for c, s in summary["by_category"].items()}
            == {"color": 0.5, "count": 1.0})


def test_format_question_lists_options_once():
    item = benchmark_files.Item("1", [], "Which color?", "A", ["red", "blue"])
    assert evaluation.format_question(item) == "Which color?\nA. red\nB. blue"
    listed = benchmark_files.Item("2", [], "Which color? A. red B. blue", "A", ["red", "blue"])
    # as the toy world writes it
    assert evaluation.format_question(listed) == "Which color? A. red B. blue"
    assert (evaluation.format_question(benchmark_files.Item("3", [], "How many?", "3"))
            == "How many?")


def test_json_list_with_alternative_keys_and_base64(tiny, monkeypatch, folder):
    rows = [
        {"question_id": 7, "img": b64("red", prefix=True), "query": "Which landmark is this?",
         "label": "The Eiffel Tower", "subject": "geo"},
        {"pid": "x2", "image_path": b64("blue"), "prompt": "Which is bigger? (A) cat (B) dog",
         "gt_answer": "B", "task": "compare"},  # options inside the question, answer a letter
        {"id": "x3", "images": ["img/red.png", b64("green")], "question": "Count the squares.",
         "answer": 3, "options": [], "category": "count"},  # a number answer, an empty options list
        {"id": "bad", "image": "bm90IGFuIGltYWdl" * 8, "question": "Q?",
         "answer": "1"},  # base64, not an image
    ]
    path = write_json(folder / "bench.json", rows)
    responses = {"landmark": "the eiffel tower.", "bigger": "The dog. So B", "Count the": "three"}
    items, results, report, _ = run(tiny, monkeypatch, path, responses)
    assert [(i.id, i.category, i.answer_type, i.choices) for i in items] == [
        ("7", "geo", "free_form", None), ("x2", "compare", "multiple_choice", ["cat", "dog"]),
        ("x3", "count", "integer", None)]
    assert isinstance(items[0].images[0], bytes) and items[0].images[0] == png("red")
    assert items[2].images == [str(folder / "img" / "red.png"), png("green")]
    assert report["bad"] == {"unreadable image": 1}
    assert graded(results) == [("7", "the eiffel tower.", True), ("x2", "B", True),
                               ("x3", "three", True)]  # a number word is its number


def test_json_object_of_rows_mm_vet(tiny, monkeypatch, folder):
    rows = {"v1_0": {"imagename": "green.png", "question": "What is 1/2 + 1/4?",
                     "answer": "0.75<OR>3/4", "capability": ["math", "ocr"]}}
    path = write_json(folder / "mm-vet.json", rows)
    items, results, _, _ = run(tiny, monkeypatch, path, {"1/2 + 1/4": r"\boxed{\frac{3}{4}}"})
    assert ((items[0].id, items[0].category, items[0].answer_type)
            == ("v1_0", "math,ocr", "free_form"))
    assert graded(results) == [("v1_0", r"\frac{3}{4}", True)]


def test_mmmu_style_rows(tiny, monkeypatch, folder):
    rows = [
        {"id": "validation_Art_1", "question": "<image 1> Which painting is shown in <image 2>?",
         "options": "['Mona Lisa', 'Starry Night', 'The Scream']", "answer": "B",
         "image_1": b64("red"), "image_2": "img/blue.png", "image_3": None, "subfield": "Art"},
        {"id": "validation_Math_2", "question": "What is the slope? <image 1>", "options": "[]",
         "answer": "3.5", "image_1": {"bytes": b64("green"), "path": None}, "subfield": "Math"},
        {"id": "validation_Math_3", "question": "<image 1>", "options": "['1', '2']", "answer": "A",
         "image_1": "img/red.png", "subfield": "Math"},  # only a placeholder: empty question
    ]
    path = str(folder / "mmmu.jsonl")
    write_jsonl(path, rows)
    responses = {"Which painting": "Starry Night", "slope": "The answer is 3.50"}
    items, results, report, stub = run(tiny, monkeypatch, path, responses)
    assert items[0].question == "Which painting is shown in ?"
    assert items[0].choices == ["Mona Lisa", "Starry Night", "The Scream"]
    assert (items[1].choices, items[1].answer_type) == (None, "float")
    assert report["bad"] == {"empty question": 1}
    assert graded(results) == [("validation_Art_1", "Starry Night", True),
                               ("validation_Math_2", "3.50", True)]
    assert [len(p.image_grid_thw) for p in stub.prompts] == [2, 1]
    prompt = tiny[1].tokenizer.decode(stub.prompts[0].input_ids)
    assert "Which painting is shown in ?\nA. Mona Lisa\nB. Starry Night\nC. The Scream\n" in prompt


def test_yes_no_hallusionbench(tiny, monkeypatch, folder):
    os.makedirs(folder / "hb" / "VD")
    (folder / "hb" / "VD" / "0.png").write_bytes(png("red"))
    rows = [
        {"category": "VD", "subcategory": "illusion", "question": "Is the square red?",
         "gt_answer": "1", "filename": "./hb/VD/0.png"},
        {"category": "VD", "question": "Is the square blue?", "gt_answer": "0",
         "filename": "./hb/VD/0.png"},
        {"category": "VS", "question": "Is the sky green?", "gt_answer": "0",
         "filename": "./hb/VD/0.png"},
        {"category": "VS", "question": "Is Paris in France?", "gt_answer": "1",
         "filename": None},  # text only
    ]
    path = write_json(folder / "HallusionBench.json", rows)
    responses = {"square red": "Yes.", "square blue": "\\boxed{not yes}",
                 "sky green": "No, it is not."}
    items, results, report, _ = run(tiny, monkeypatch, path, responses)
    assert report["layout"] == "yesno" and report["bad"] == {"missing image": 1}
    assert [(i.answer, i.answer_type) for i in items] == [("yes", "yes_no"), ("no", "yes_no"),
                                                          ("no", "yes_no")]
    assert graded(results) == [("0", "Yes.", True), ("1", "not yes", False),
                               ("2", "No, it is not.", True)]
    # as a native file the same rows would keep "1" / "0" as numbers: the layout can be forced
    assert benchmark_files.load_benchmark(path, layout="native")[0].answer_type == "integer"


def test_options_in_the_question_mmstar_realworldqa(tiny, monkeypatch, folder):
    rows = [
        {"index": 1, "question": "Which shape is shown?\n"
                                 "Options: A: circle, B: square, C: triangle",
         "answer": "C", "category": "coarse perception", "image": b64("red")},
        {"index": 2, "question": "How far is the car?\nA. 5 m\nB. 10 m\n"
                                 "Please answer directly with the letter.",
         "answer": "A", "category": "depth", "image": b64("blue")},
        {"index": 3, "question": "How many lanes? "
                                 "Please answer directly with a single word or number.",
         "answer": "2", "category": "depth", "image": b64("blue")},
    ]
    path = str(folder / "mmstar.jsonl")
    write_jsonl(path, rows)
    responses = {"Which shape": "Triangle.", "How far": "10 m", "How many lanes": "Two"}
    items, results, _, stub = run(tiny, monkeypatch, path, responses)
    assert items[0].choices == ["circle", "square", "triangle"]
    assert items[1].choices == ["5 m", "10 m"]  # an option ends at its line's end
    assert graded(results) == [("1", "Triangle.", True), ("2", "10 m", False),
                               ("3", "Two", True)]  # "a single word or number": two is 2
    # options already in the text are not listed twice
    assert tiny[1].tokenizer.decode(stub.prompts[0].input_ids).count("circle") == 1


def test_vlmevalkit_tsv(tiny, monkeypatch, folder):
    header = "index\timage\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\n"
    lines = [f"10\t{b64('red')}\tWhat color?\tLook at the center.\tred\tblue\t\t\tA\tcolor\n",
             "11\t10\tWhat shape?\t\tcircle\tsquare\tstar\t\tC\tshape\n",  # the image of row 10
             "12\t99\tWhat now?\t\tyes\tno\t\t\tA\tshape\n"]  # refers to no row: missing image
    path = folder / "MMStar.tsv"
    path.write_text(header + "".join(lines))
    responses = {"What color": "\\boxed{red}", "What shape": "B"}
    items, results, report, _ = run(tiny, monkeypatch, str(path), responses)
    assert items[0].question == "Look at the center.\nWhat color?"
    assert [i.choices for i in items] == [["red", "blue"], ["circle", "square", "star"]]
    assert items[1].images == [png("red")]
    assert report["bad"] == {"missing image": 1}
    assert graded(results) == [("10", "red", True), ("11", "B", False)]


def test_every_row_bad_is_an_error(folder):
    path = str(folder / "bad.jsonl")
    write_jsonl(path, [{"image": "img/missing.png", "question": "Q?", "answer": "1"},
                       {"image": "img/red.png", "question": "", "answer": "1"}])
    with pytest.raises(ValueError,
                       match=r"bad.jsonl.*none of its 2 rows.*empty question 1, missing image 1"):
        benchmark_files.load_benchmark(path)
    with pytest.raises(ValueError, match="unknown layout 'csv'"):
        benchmark_files.load_benchmark(path, layout="csv")
    with pytest.raises(FileNotFoundError):
        benchmark_files.load_benchmark(str(folder / "nope.jsonl"))


def test_json_lines_named_json_and_parquet(folder):
    rows = [{"image": "img/red.png", "question": f"Q{i}?", "answer": str(i)} for i in (1, 2)]
    write_jsonl(str(folder / "lines.json"), rows)
    assert ([i.question for i in benchmark_files.load_benchmark(str(folder / "lines.json"))]
            == ["Q1?", "Q2?"])
    (folder / "mmstar.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="parquet is not read here.*docs/evaluation.md"):
        benchmark_files.load_benchmark(str(folder / "mmstar.parquet"))


def test_unreadable_at_evaluation_is_skipped_and_counted(tiny, monkeypatch, folder):
    items = [benchmark_files.Item("ok", [str(folder / "img" / "red.png")], "Is it red?", "yes",
                                  answer_type="yes_no"),
             benchmark_files.Item("gone", [str(folder / "img" / "gone.png")], "Is it red?", "yes",
                                  answer_type="yes_no")]
    monkeypatch.setattr(evaluation, "generate", Stub({"red": "yes"}))
    report = evaluation.Counter()
    results = evaluation.evaluate(*tiny, items, SETTING, progress=False, report=report)
    assert graded(results) == [("ok", "yes", True)] and report == {"unreadable image": 1}


# ----------------------------------------------------------------------------
# Sampled answers, the judge


def test_samples_and_majority(tiny, monkeypatch, folder):
    items = [benchmark_files.Item("1", [str(folder / "img" / "red.png")], "How many?", "3",
                                  answer_type="integer")]
    texts = iter([["\\boxed{3}"], ["\\boxed{4}", "3", "The answer is 3", "many"]])
    monkeypatch.setattr(evaluation, "generate", lambda *args, **kwargs: next(texts))
    [row] = evaluation.evaluate(*tiny, items, replace(SETTING, samples=4), progress=False)
    assert (row["correct"] and row["sample_correct"] == [False, True, True, False]
            and row["majority_correct"])
    summary = evaluation.summarize([row])
    assert summary["pass@1"] == 0.5 and summary["majority@k"] == 1.0 and summary["pass@k"] == 1.0
    # a second item with no right sample: pass@k (any right) is 1/2 over the two items
    other = {**row, "sample_correct": [False] * 4, "majority_correct": False}
    assert evaluation.summarize([row, other])["pass@k"] == 0.5


class JudgeServer(http.server.BaseHTTPRequestHandler):
    reply, requests = "Yes.", []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        JudgeServer.requests.append((self.path, self.headers.get("Authorization"), body))
        out = json.dumps({"choices": [{"message": {"role": "assistant",
                                                   "content": JudgeServer.reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = http.server.HTTPServer(("127.0.0.1", 0), JudgeServer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_judge_equivalent_against_a_local_stub(judge_url):
    JudgeServer.requests.clear()
    JudgeServer.reply = "Yes. They match."
    assert evaluation.judge_equivalent("Where?", "Paris", "the French capital", url=judge_url,
                                       model="judge-1", api_key="k") is True
    path, auth, body = JudgeServer.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "judge-1" and body["temperature"] == 0
    assert ("Reference answer: Paris\nCandidate answer: the French capital"
            in body["messages"][0]["content"])
    JudgeServer.reply = "no"
    assert evaluation.judge_equivalent("Where?", "Paris", "Rome", url=judge_url + "/v1",
                                       model="judge-1") is False
    assert (JudgeServer.requests[1][0] == "/v1/chat/completions"
            and JudgeServer.requests[1][1] is None)
    JudgeServer.reply = "Hard to say."
    assert evaluation.judge_equivalent("Where?", "Paris", "?",
                                       url=judge_url + "/v1/chat/completions", model="m") is None


def test_judge_unreachable_is_no_verdict(judge_url):
    server_port = int(judge_url.rsplit(":", 1)[1])
    with http.server.HTTPServer(("127.0.0.1", 0), JudgeServer) as closed:
        port = closed.server_port
    assert port != server_port
    assert evaluation.judge_equivalent("q", "a", "b", url=f"http://127.0.0.1:{port}", model="m",
                                       timeout=2) is None


def test_judge_only_regrades_wrong_free_form_answers(tiny, monkeypatch, folder):
    image = [str(folder / "img" / "red.png")]
    items = [benchmark_files.Item("ff", image, "Which city?", "Paris", answer_type="free_form"),
             benchmark_files.Item("ok", image, "Which town?", "Paris", answer_type="free_form"),
             benchmark_files.Item("mc", image, "Which one?", "A", ["red", "blue"],
                                  answer_type="multiple_choice")]
    monkeypatch.setattr(evaluation, "generate", Stub({"city": "The capital of France",
                                                      "town": "paris", "one": "B"}))
    asked = []

    def judge(question, reference, prediction):
        asked.append((question, reference, prediction))
        return True

    results = evaluation.evaluate(*tiny, items, SETTING, judge=judge, progress=False)
    assert asked == [("Which city?", "Paris", "The capital of France")]
    assert [(r["id"], r.get("judge"), r["correct"]) for r in results] == [("ff", True, True),
                                                                         ("ok", None, True),
                                                                         ("mc", None, False)]


# ----------------------------------------------------------------------------
# The table and the command line


def test_format_table_by_hand():
    def summary(n, accuracy, **categories):
        return {"n": n, "accuracy": accuracy,
                "by_category": {c: {"n": cn, "accuracy": ca} for c, (cn, ca) in categories.items()}}

    summaries = {"base": {"a": summary(4, 0.25, x=(2, 0.5), y=(2, 0.0)),
                          "b": summary(2, 0.5, all=(2, 0.5))},
                 "v1": {"a": summary(4, 0.75, x=(2, 1.0), y=(2, 0.5)),
                        "b": summary(2, 0.5, all=(2, 0.5))}}
    assert evaluation.format_table(summaries, {"a": 3, "b": 0}) == "\n".join([
        "| benchmark | n | skipped | base | v1 | Δ v1 |",
        "|---|---|---|---|---|---|",
        "| a | 4 | 3 | 25.0 | 75.0 | +50.0 |",
        "| a/x | 2 |  | 50.0 | 100.0 | +50.0 |",
        "| a/y | 2 |  | 0.0 | 50.0 | +50.0 |",
        "| b | 2 | 0 | 50.0 | 50.0 | +0.0 |",
        "| average | 6 | 3 | 37.5 | 62.5 | +25.0 |"])  # (25 + 50) / 2, (75 + 50) / 2


def test_cli_compares_checkpoints(tiny_model_dir, folder, monkeypatch, capsys):
    toy = [
        {"id": "t1", "image": "img/red.png", "question": "Which color?",
         "choices": ["red", "blue"], "answer": "A", "category": "color"},
        {"id": "t2", "image": "img/blue.png", "question": "Which hue?",
         "choices": ["red", "blue"], "answer": "B", "category": "color"},
        {"id": "t3", "image": "img/red.png", "question": "How many red?", "answer": "1",
         "category": "count"},
        {"id": "t4", "image": "img/red.png", "question": "How many blue?", "answer": "0",
         "category": "count"},
        {"id": "bad1", "image": "img/missing.png", "question": "Q?", "answer": "1"},
        {"id": "bad2", "image": "img/red.png", "question": "", "answer": "1"},
    ]
    write_jsonl(str(folder / "toy.jsonl"), toy)
    hb = [
        {"category": "VD", "question": "Is it red?", "gt_answer": "1", "filename": "img/red.png"},
        {"category": "VD", "question": "Is it blue?", "gt_answer": "0", "filename": "img/red.png"},
        {"category": "VD", "question": "Is it round?", "gt_answer": "0", "filename": None},
    ]
    write_json(folder / "hb.json", hb)
    for name in ("base", "reasoner_v1"):
        os.symlink(tiny_model_dir, folder / name)
    stub = Stub({"base": {"Which color": "\\boxed{A}", "Which hue": "A", "How many red": "2",
                          "How many blue": "1", "Is it red": "yes", "Is it blue": "yes"},
                 "reasoner_v1": {"Which color": "red", "Which hue": "\\boxed{B}",
                                 "How many red": "1", "How many blue": "one", "Is it red": "Yes!",
                                 "Is it blue": "No."}}, by_model=True)
    monkeypatch.setattr(evaluation, "generate", stub)
    out = folder / "out"
    summaries = evaluation.main(["--model", str(folder / "base"),
                                 "--model", str(folder / "reasoner_v1"),
                                 "--bench", f"toy={folder / 'toy.jsonl'}",
                                 "--bench", f"hb={folder / 'hb.json'}",
                                 "--out", str(out), "--device", "cpu", "--min-pixels", "784",
                                 "--max-pixels", "12544", "--batch-size", "3"])
    table = "\n".join([
        "| benchmark | n | skipped | base | reasoner_v1 | Δ reasoner_v1 |",
        "|---|---|---|---|---|---|",
        "| toy | 4 | 2 | 25.0 | 75.0 | +50.0 |",
        "| toy/color | 2 |  | 50.0 | 100.0 | +50.0 |",
        "| toy/count | 2 |  | 0.0 | 50.0 | +50.0 |",
        "| hb | 2 | 1 | 50.0 | 100.0 | +50.0 |",
        "| hb/VD | 2 |  | 50.0 | 100.0 | +50.0 |",
        "| average | 6 | 3 | 37.5 | 87.5 | +50.0 |"])
    assert capsys.readouterr().out.strip() == table
    assert summaries["reasoner_v1"]["toy"]["accuracy"] == 0.75
    rows = read_jsonl(str(out / "reasoner_v1" / "toy.jsonl"))
    assert [(r["id"], r["prediction"], r["extracted"], r["correct"]) for r in rows] == [
        ("t1", "red", "red", True), ("t2", "\\boxed{B}", "B", True), ("t3", "1", "1", True),
        ("t4", "one", "one", False)]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["table"] == table and list(saved["checkpoints"]) == ["base", "reasoner_v1"]
    assert saved["benchmarks"]["toy"]["bad"] == {"empty question": 1, "missing image": 1}
    assert saved["benchmarks"]["hb"]["layout"] == "yesno"
    # --max-items and --layout
    evaluation.main(["--model", str(folder / "base"), "--bench", f"hb={folder / 'hb.json'}",
                     "--layout", "hb=native", "--max-items", "1", "--min-pixels", "784",
                     "--max-pixels", "12544"])
    # "yes" is not the number 1
    assert capsys.readouterr().out.splitlines()[2] == "| hb | 1 | 1 | 0.0 |"
    with pytest.raises(SystemExit, match="match no --bench"):
        evaluation.main(["--model", "m", "--bench", "a=x.jsonl", "--layout", "b=yesno"])


def test_checkpoint_names():
    assert evaluation.checkpoint_names(["runs/a/reasoner_v1", "runs/a/reasoner_v2/"]) == [
        "reasoner_v1", "reasoner_v2"]
    assert evaluation.checkpoint_names(["runs/a/reasoner_v1", "runs/b/reasoner_v1"]) == [
        "runs_a_reasoner_v1", "runs_b_reasoner_v1"]


# ----------------------------------------------------------------------------
# The real sampler


def test_two_image_prompt_samples_and_scores(tiny):
    model, processor = tiny
    tokens = special_tokens(processor, model)
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue")
    prompts = [reasoner_prompt(processor, [red, blue], "Are the two images the same color?"),
               reasoner_prompt(processor, red, "How many red objects are there?")]
    assert prompts[0].image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]]  # 4 + 6 merged image tokens
    assert (prompts[0].input_ids == tokens.image_token_id).sum() == 10
    generator = torch.Generator().manual_seed(0)
    out = rollout(model, prompts, group_size=2, sampling=Sampling(1.0, 1.0, 0, 6), tokens=tokens,
                  limits=Limits(2), generator=generator)
    rows = [prompts[i] for i in out.prompt_index.tolist()]
    with torch.no_grad():
        scored, _ = completion_logprobs(model, rows, out.completion_ids, out.completion_mask,
                                        tokens=tokens)
    mask = out.completion_mask.bool()
    assert mask.any() and torch.allclose(scored[mask], out.logprobs[mask], atol=1e-5)


def test_real_model_end_to_end(tiny, benchmark_file):
    report = {}
    items = benchmark_files.load_benchmark(benchmark_file, report=report)
    assert report["items"] == report["rows"] == 16 and report["bad"] == {}
    setting = replace(SETTING, max_new_tokens=6, batch_size=8, samples=2)
    results = evaluation.evaluate(*tiny, items, setting, progress=False)
    summary = evaluation.summarize(results)
    assert summary["n"] == len(items) == 16 and 0.0 <= summary["accuracy"] <= 1.0
    assert 0.0 <= summary["pass@1"] <= 1.0 and 0.0 <= summary["majority@k"] <= 1.0
    assert all(isinstance(r["prediction"], str) and len(r["sample_correct"]) == 2 for r in results)
