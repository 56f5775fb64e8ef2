"""bench/bench_vs_trl.py on a tiny model: both sides run, alternate, get byte-identical
prompts and generate the same token count. Skipped where TRL is not installed (CI: TRL is not a
project requirement)."""

import os
import sys

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_vs_trl as bench  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bench_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vs_trl") / "model")
    bench.build_model(path, dict(hidden_size=64, layers=2, heads=4, kv_heads=2, vision_hidden=32,
                                 vision_depth=2), image_side=112)
    return path


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_both_sides_same_work(tiny_bench_model, tmp_path, beta):
    items = bench.make_items(2, 112)
    threads = torch.get_num_threads()
    result = bench.compare(tiny_bench_model, items, group=2, beta=beta, new_tokens=4, steps=2,
                           warmup=1, threads=threads, output_dir=str(tmp_path / "trl"))
    assert result["problems"] == []
    for side in ("visplay", "trl"):
        assert len(result[side]) == 2
        for step in result[side]:
            assert step["total"] > 0 and step["gen"] > 0 and step["update"] > 0
            assert step["gen"] + step["score"] + step["update"] == pytest.approx(step["total"])
    row = bench.table_row("tiny", 1e6, 2, beta, result)
    assert row.count("|") == 10 and "x |" in row
    assert len(result["rows_trained"]) == 2


def test_train_every_row_trains_rows_without_advantage(tiny_bench_model, tmp_path):
    """With beta 0 visplay skips rows whose advantage is 0 (the random model's rewards are all
    0: it trains none of 4); `train_every_row` trains all 4, as TRL does."""
    items = bench.make_items(2, 112)
    skip = bench.grpo.trained_rows
    for every, share in ((False, 0.0), (True, 1.0)):
        result = bench.compare(tiny_bench_model, items, group=2, beta=0.0, new_tokens=4, steps=1,
                               warmup=0, threads=torch.get_num_threads(),
                               output_dir=str(tmp_path / "trl"), train_every_row=every)
        assert result["rows_trained"] == [share]
    assert bench.grpo.trained_rows is skip


def test_different_prompts_are_refused(tiny_bench_model):
    """The same-prompt check compares ids and pixels row by row, G rows per prompt."""
    side = bench.VisplaySide(tiny_bench_model, bench.make_items(2, 112), group=2, beta=0.0,
                             new_tokens=4)
    prompts = side.prompts()
    call = {"prompt_ids": [p.input_ids.tolist() for p in prompts for _ in range(2)],
            "fields": {"pixel_values": torch.cat([p.pixel_values for p in prompts
                                                  for _ in range(2)]),
                       "image_grid_thw": torch.cat([p.image_grid_thw for p in prompts
                                                    for _ in range(2)])}}
    bench.check_same_prompts(call, prompts, 2)
    call["fields"]["pixel_values"] = call["fields"]["pixel_values"].clone()
    call["fields"]["pixel_values"][-1, 0] += 1e-3
    with pytest.raises(bench.WorkMismatch, match="row 3"):
        bench.check_same_prompts(call, prompts, 2)
