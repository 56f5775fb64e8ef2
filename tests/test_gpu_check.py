"""bench/gpu_check.py: its numbers against hand-worked ones (the HBM floor, the weight bytes a
decode forward reads, the distances between weight lists), the whole check at the tiny shape on
CPU (every part prints a row with numbers, the report is written), a failing part reported in
its row while the next part runs, and user mistakes ending in one line."""

import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import gpu_check  # noqa: E402

# The tiny shape by hand (bench_real_shapes.SHAPES["tiny"]): hidden 64, 4 heads of 16, 2 KV heads,
# MLP 128, 2 layers, vocabulary 1000, lm_head untied. Per layer: q 64 x 64 + 64 = 4160, k and v
# 64 x 32 + 32 = 2080 each, o 64 x 64 = 4096, MLP 3 x 64 x 128 = 24,576, two norms 128: 37,120;
# x 2 = 74,240, final norm 64, lm_head 64,000: 138,304 weights a decode forward reads.
TINY_DECODE_WEIGHTS = 138_304
# KV cache per token: 2 (K, V) x 2 layers x 2 KV heads x 16 x 2 bytes (bf16) = 256.
TINY_KV_BYTES = 256
# Qwen2.5-VL-3B's text model (tests/test_bench_real_shapes.py): 3,085,938,688 parameters, the
# embedding tied to lm_head, so the projection is read in its place.
TEXT_3B = 3_085_938_688


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(out):
    """{first cell: cells} of the printed table's rows."""
    rows = {}
    for line in out.splitlines():
        if re.match(r"\| \d [a-z]", line):  # not the per-step table's "| 1 | ..."
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_decode_floor_by_hand():
    # 4 forwards after the prefill's token; forward s reads 10 + s + 1 positions per row:
    # 11 + 12 + 13 + 14 = 50; 4 x 1e9 weight bytes + 3 rows x 50 x 1000 bytes = 4.00015e9 bytes
    # at 1e10 bytes/s.
    seconds = gpu_check.decode_floor_seconds(
        weight_bytes=1e9, kv_bytes_per_token=1000, rows=3, prompt_tokens=10, new_tokens=5,
        bytes_per_second=1e10)
    assert seconds == pytest.approx(0.400015)
    # one new token: no decode forward at all
    assert gpu_check.decode_floor_seconds(weight_bytes=1e9, kv_bytes_per_token=1000, rows=3,
                                          prompt_tokens=10, new_tokens=1,
                                          bytes_per_second=1e10) == 0


def test_decode_weight_bytes_by_hand():
    shapes = gpu_check.shapes
    tiny = shapes.build_model(shapes.build_config("tiny"), "meta")
    assert gpu_check.decode_weight_bytes(tiny, 2) == TINY_DECODE_WEIGHTS * 2
    model_3b = shapes.build_model(shapes.build_config("3b"), "meta")
    assert gpu_check.decode_weight_bytes(model_3b, 2) == TEXT_3B * 2  # 6.17 GB


def test_distances_by_hand():
    a = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0]])]
    b = [torch.tensor([0.0, 4.0]), torch.tensor([[0.0]])]
    assert gpu_check.l2_distance(a, b) == pytest.approx(5.0)
    assert gpu_check.relative_distance(a, b) == pytest.approx(5.0 / 4.0)
    start = [torch.tensor([1.0, 1.0])]
    # updates (1, 1) and (2, 2): the same direction; (1, 1) and (1, -1): orthogonal
    assert gpu_check.update_cosine([torch.tensor([2.0, 2.0])], [torch.tensor([3.0, 3.0])],
                                   start) == pytest.approx(1.0)
    assert gpu_check.update_cosine([torch.tensor([2.0, 2.0])], [torch.tensor([2.0, 0.0])],
                                   start) == pytest.approx(0.0, abs=1e-12)


def test_tiny_check_prints_every_part(tmp_path, capsys, one_thread):
    path = tmp_path / "CHECK.md"
    argv = ["--shape", "tiny", "--device", "cpu", "--write", str(path)]
    results = gpu_check.main(argv)
    assert list(results) == gpu_check.PARTS
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["1 precision: bf16 compute vs fp32", "2 memory: rollout",
                          "2 memory: GRPO step", "3 decode: copy bandwidth",
                          "3 decode: tokens/s", "4 prefix: shared prefix",
                          "4 prefix: one row per completion", "5 fits in 80 GiB"]
    for cells in rows.values():
        assert len(cells) == 6 and re.search(r"\d", cells[2] + cells[3]), cells

    precision = rows["1 precision: bf16 compute vs fp32"]
    cosine = float(precision[4].removeprefix("cosine "))
    assert 0.9 <= cosine <= 1.0  # the bound tests/test_precision.py asks of bf16 compute
    assert "bf16 tracks fp32" in precision[5]
    fp32, bf16 = (float(x) for x in re.findall(r"(?:fp32|bf16) ([\d.e+-]+)", precision[3]))
    assert fp32 > 0 and bf16 == pytest.approx(fp32, rel=0.1)  # both runs moved, about as far

    # the floor of 16 prompts x G 8 = 128 rows of 59 tokens (56 px: 4 image tokens + 55),
    # 8 new tokens: 7 forwards of 138,304 x 2 bytes of weights; cache positions 7 x 60 + 21 =
    # 441 per row, x 128 rows x 256 bytes; at 4,800 GB/s
    decode = rows["3 decode: tokens/s"]
    floor = (7 * TINY_DECODE_WEIGHTS * 2 + 128 * 441 * TINY_KV_BYTES) / 4.8e12  # 3.41e-06 s
    assert f"floor {floor:.2e} s at 4,800 GB/s" in decode[3]
    assert "128 rows, 59-token prompts, 8 new tokens" in decode[1]
    assert float(decode[2].split(" tok/s")[0].replace(",", "")) > 0

    for label in ("4 prefix: shared prefix", "4 prefix: one row per completion"):
        assert float(rows[label][2].split(" s, ")[0]) > 0
    assert rows["4 prefix: shared prefix"][4].endswith("x faster")
    assert "predicted: fits, 80.0 GiB to spare" in rows["5 fits in 80 GiB"][5]
    for label in ("2 memory: rollout", "2 memory: GRPO step"):
        assert rows[label][2] == "-" and float(rows[label][3].split()[1]) > 0  # CPU: predicted

    text = path.read_text()
    assert "`python bench/gpu_check.py " + " ".join(argv) + "`" in text
    assert all("| " + " | ".join(cells) + " |" in text for cells in rows.values())
    assert "| step | loss fp32 | loss bf16 |" in text
    assert re.search(r"Total [\d.]+ s of a 480 s budget", text)


def test_a_failing_part_is_reported_and_the_next_runs(monkeypatch, capsys, one_thread):
    """Part 1's steps fail, part 2's measured GRPO step and part 4's one-row-per-completion
    update run out of memory: each says so in its row, and what did run is still measured."""
    real_train_step = gpu_check.train_step

    def train_step(learner, batch, cfg):
        if len(batch.prompts) == 4:  # part 1's batch
            raise RuntimeError("a step failed (simulated)")
        measured_step = len(batch.prompts) == 2 and batch.sampled.completion_ids.shape[1] == 16
        if measured_step or not cfg.shared_prefix:  # part 2 after its warm-up; part 4 per row
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_train_step(learner, batch, cfg)

    monkeypatch.setattr(gpu_check, "train_step", train_step)
    results = gpu_check.main(["--shape", "tiny", "--device", "cpu", "--skip", "decode",
                              "--repeats", "1"])
    assert list(results) == ["precision", "memory", "prefix", "fits"]
    rows = _rows(capsys.readouterr().out)
    assert rows["1 precision"][2] == "error: RuntimeError: a step failed (simulated)"
    rollout, update = rows["2 memory: rollout"], rows["2 memory: GRPO step"]
    assert rollout[2] == "-" and re.match(r"[\d.]+ s$", rollout[5])  # measured (CPU: no peak)
    assert update[2] == "OOM" and float(update[3].split()[1]) > 0  # the prediction stays
    shared, per_row = rows["4 prefix: shared prefix"], rows["4 prefix: one row per completion"]
    assert float(shared[2].split(" s, ")[0]) > 0 and shared[4] == "-"
    assert per_row[2] == "OOM"
    fits = rows["5 fits in 80 GiB"]
    assert fits[2] == "OOM in the GRPO step" and "predicted: fits" in fits[5]


def test_no_part_starts_past_the_budget(capsys):
    gpu_check.main(["--shape", "tiny", "--device", "cpu", "--budget-s", "0", "--skip",
                    "memory,decode,prefix,fits"])
    assert _rows(capsys.readouterr().out)["1 precision"][2] == "not run: budget spent"


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "57"], "error: --image-size: image side 57 px: must be a multiple of 28"),
    (["--skip", "nope"], "error: --skip 'nope': choose from precision, memory"),
    (["--repeats", "0"], "error: --repeats: must be > 0"),
    (["--preset", "/no/such.yaml"], "error: --preset: config file '/no/such.yaml' not found"),
])
def test_user_mistakes_end_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--shape", "tiny", "--device", "cpu"] + argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
