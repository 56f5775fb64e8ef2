"""toyworld/claim.py: its settings are the configurations they are named after, and its
post-hoc counts (answer flips, absent-object accuracy) match counts worked out by hand."""

import json
import os

import visplay
from config import load_config
from toyworld import claim

CONFIG = os.path.join(claim.ROOT, "config.yaml")


def _filter(setting):
    labeling = load_config(CONFIG, claim.SETTINGS[setting]).labeling
    return labeling.p_low, labeling.p_high, labeling.p_low_yes_no


def test_paper_filter_is_the_papers_and_full_differs_only_by_the_yes_no_floor():
    paper = load_config(None).labeling  # config.py's defaults are the paper's settings
    assert _filter("paper_filter") == (paper.p_low, paper.p_high, paper.p_low_yes_no)
    assert _filter("paper_filter") == (0.3, 0.8, None)
    low, high, floor = _filter("full")
    assert (low, high) == (0.3, 0.8) and floor is not None and floor > high


def test_a_settings_own_keys_win_over_the_command_lines():
    extra = ["questioner.steps=30", "questioner.lr=1e-4", "labeling.p_high=0.9"]
    untrained = load_config(CONFIG, claim.overrides("no_questioner", extra))
    assert untrained.questioner.steps == 0 and untrained.questioner.lr == 1e-4
    full = load_config(CONFIG, claim.overrides("full", extra))
    assert full.questioner.steps == 30 and full.labeling.p_high == 0.9
    assert load_config(CONFIG, claim.overrides("no_filter", extra)).labeling.p_high == 1.0


def test_no_filter_keeps_every_labeled_question_and_full_no_uncertain_yes_no():
    rows = [{"id": i, "silver_answer": a, "confidence": p} for i, (a, p) in enumerate([
        ("4", 0.125), ("4", 1.0), ("no", 0.5), ("yes", 1.0), ("3", 0.5)])]
    kept = {setting: [r["id"] for r in visplay.keep_informative(rows, *_filter(setting))]
            for setting in ("no_filter", "paper_filter", "full")}
    assert kept == {"no_filter": [0, 1, 2, 3, 4], "paper_filter": [2, 4], "full": [4]}


def test_flips_and_absent_object_accuracy(tmp_path):
    run = tmp_path / "seed0" / "full"
    run.mkdir(parents=True)
    # id: (category, answer, correct at iterations 0, 1, 2)
    items = {"a": ("exists", "no", (True, False, True)),     # an absent object: r->w, w->r
             "b": ("exists", "no", (False, True, True)),     # an absent object: w->r
             "c": ("exists", "yes", (True, False, False)),   # present: not in the probe; r->w
             "d": ("count_total", "5", (False, False, True))}  # w->r at iteration 2
    for i in range(3):
        with open(run / f"eval_v{i}_items.jsonl", "w") as f:
            for key, (category, answer, correct) in items.items():
                f.write(json.dumps({"id": key, "category": category, "answer": answer,
                                    "correct": correct[i]}) + "\n")
    flips, absent = claim.flips_and_absent(str(tmp_path), 0, "full", 3)
    assert flips == [(2, 1), (0, 2)]
    assert absent == [50.0, 50.0, 100.0]
