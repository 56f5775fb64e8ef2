"""bench/bench_real_shapes.py: its memory prediction against hand-worked numbers for the real
3B shape (no 3B weights are ever built: parameters are counted on the meta device), and a CPU
smoke run of the whole benchmark on the tiny shape, OOM paths included."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_real_shapes as bench  # noqa: E402

GIB = 2**30
# Qwen2.5-VL-3B by hand.
# Text: embeddings 151936 x 2048 = 311,164,928 (lm_head tied: not counted again); per layer
# q 2048 x 2048 + 2048 bias, k and v 2048 x 256 + 256 bias each, o 2048 x 2048, MLP 3 x 2048 x
# 11008, two RMSNorms 2 x 2048: 77,076,992; x 36 layers = 2,774,771,712; final norm 2048.
# Text total 3,085,938,688.
# Vision: patch conv 1280 x 3 x 2 x 14 x 14 = 1,505,280; per block qkv 1280 x 3840 + 3840,
# proj 1280 x 1280 + 1280, gate and up 1280 x 3420 + 3420 each, down 3420 x 1280 + 1280, two
# RMSNorms 2 x 1280: 19,702,200; x 32 = 630,470,400; merger RMSNorm 1280 + 5120 x 5120 + 5120
# + 5120 x 2048 + 2048 = 36,708,608. Vision total 668,684,288.
PARAMS_3B = 3_085_938_688 + 668_684_288  # 3,754,622,976
# KV cache per token: 2 (K, V) x 36 layers x 2 KV heads x head_dim 128 x 2 bytes (bf16).
KV_BYTES_3B = 36_864


@pytest.fixture(scope="module")
def config_3b():
    return bench.build_config("3b")


@pytest.fixture
def one_thread():
    """One CPU thread for the smoke runs: their ops are tiny (one thread is as fast), and on a
    small machine shared with other jobs two spinning threads per process stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_3b_parameter_count_and_kv_bytes(config_3b):
    assert bench.count_parameters(config_3b) == PARAMS_3B
    assert bench.sampler.kv_bytes_per_token(config_3b, torch.bfloat16) == KV_BYTES_3B


def test_predict_memory_3b_by_hand(config_3b):
    """8 prompts of 1000 text tokens x G 8, 256 new tokens, micro-batch 8, checkpointing on."""
    got = bench.predict_memory(config_3b, n_params=PARAMS_3B, prompts=8, group_size=8,
                               prompt_tokens=1000, new_tokens=256, micro_batch_size=8,
                               activation_checkpointing=True, reference=False, image_tokens=0,
                               logprob_chunk=256, prefill_tokens=32768)
    n = PARAMS_3B
    assert got["weights"] == pytest.approx(n * 4 / GIB)       # 13.99 GiB
    assert got["gradients"] == pytest.approx(n * 4 / GIB)
    assert got["adamw"] == pytest.approx(n * 8 / GIB)         # 27.97 GiB
    assert got["bf16_casts"] == pytest.approx(n * 2 / GIB)    # 6.99 GiB
    assert got["reference"] == 0
    # 8 x 8 rows x 1256 tokens x 36,864 B = 2,963,275,776 B = 2.759765625 GiB exactly.
    assert got["kv_cache"] == 2.759765625
    # Prefill: 8 prompts' cache 8 x 1000 x 36,864 = 294,912,000 B, and one forward of all 8
    # (32768 // 1000 >= 8) = 8000 tokens x (2048 x 16 + 11008 x 6) B = 790,528,000 B.
    assert got["prefill"] == pytest.approx((294_912_000 + 790_528_000) / GIB)
    # Activations, 8 x 1256 = 10,048 tokens: block inputs 10,048 x 2048 x 4 B x 36 layers
    # = 2,963,275,776; one block 10,048 x (2048 x 16 + 11008 x 3) x 2 B = 1,322,156,032; final
    # hidden states and their gradient 10,048 x 2048 x 8 B = 164,626,432; logits 8 x 256 x
    # 151,936 x 12 B = 3,733,979,136. Sum 8,184,037,376 B = 7.62 GiB.
    activations = 2_963_275_776 + 1_322_156_032 + 164_626_432 + 3_733_979_136
    assert got["activations"] == pytest.approx(activations / GIB)
    # Rollout: weights + AdamW + bf16 casts (14 B/param) + the largest cache moment, the end of
    # decode (2,963,275,776 B > the G-fold copy's 8 x 9 x 1000 x 36,864 = 2,654,208,000 B).
    assert got["rollout"] == pytest.approx((n * 14 + 2_963_275_776) / GIB)   # 51.7 GiB
    # Update: weights, gradients, AdamW (16 B/param), then casts + activations (2n + 8.18e9 B)
    # outweigh the optimizer step's fp32 temporary (4n B).
    assert got["update"] == pytest.approx((n * 18 + activations) / GIB)      # 70.6 GiB


def test_predict_memory_image_and_reference_terms(config_3b):
    """A 448 px image adds its patches to the vision tower's saved inputs; a reference adds a bf16
    copy of the weights to both phases."""
    args = dict(n_params=PARAMS_3B, prompts=8, group_size=8, prompt_tokens=311, new_tokens=256,
                micro_batch_size=8, activation_checkpointing=True)
    image_tokens, prompt_tokens = bench.prompt_layout(config_3b, 448)
    assert (image_tokens, prompt_tokens) == (256, 311)  # 448 / 28 = 16 merged tokens per side
    plain = bench.predict_memory(config_3b, reference=False, image_tokens=0, **args)
    image = bench.predict_memory(config_3b, reference=False, image_tokens=256, **args)
    # 8 rows x 1024 patches x 1280 x 2 B x 32 blocks; the largest rebuilt block stays the text one
    # (8 x 567 x 131,584 B > 8 x 1024 x 1280 x 16 x 2 + 8 x 1024 x 3420 x 3 x 2 B).
    assert image["activations"] - plain["activations"] == pytest.approx(
        8 * 1024 * 1280 * 2 * 32 / GIB)
    with_reference = bench.predict_memory(config_3b, reference=True, image_tokens=0, **args)
    for phase in ("rollout", "update"):
        assert with_reference[phase] - plain[phase] == pytest.approx(PARAMS_3B * 2 / GIB)


def test_image_side_must_be_a_multiple_of_28(config_3b):
    with pytest.raises(ValueError, match="multiple of 28"):
        bench.prompt_layout(config_3b, 1000)


def test_predict_only_builds_no_weights(capsys):
    rows = bench.main(["--shape", "3b", "--predict-only", "--image-sizes", "1008",
                       "--new-tokens", "1024", "--device", "cpu"])
    assert rows == []
    out = capsys.readouterr().out
    assert "| 3b | 1008px | 1024 |" in out


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_cpu_smoke_writes_the_table(tmp_path, capsys, one_thread):
    path = tmp_path / "B.md"
    argv = ["--shape", "tiny", "--repeats", "1", "--image-sizes", "56,112", "--new-tokens", "4,8",
            "--prompts", "2", "--group-size", "2", "--device", "cpu", "--write", str(path)]
    rows = bench.main(argv)
    assert [(r["side"], r["new_tokens"]) for r in rows] == [(56, 4), (56, 8), (112, 4), (112, 8)]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(printed) == 4
    for line, (side, new_tokens) in zip(printed, [(56, 4), (56, 8), (112, 4), (112, 8)]):
        cells = _cells(line)
        assert cells[1:5] == [f"{side}px", str((side // 28) ** 2), str((side // 28) ** 2 + 55),
                              str(new_tokens)]
        for seconds in cells[5], cells[6], cells[8]:  # prefill, decode, GRPO step: min / median
            low, median = (float(x) for x in seconds.split(" / "))
            assert 0 <= low <= median
        float(cells[7])  # decode tokens per second
        assert cells[9].startswith("- / ") and cells[10].startswith("- / ")  # CPU: not measured
    text = path.read_text()
    assert "`python bench/bench_real_shapes.py " + " ".join(argv) + "`" in text
    assert f"torch {torch.__version__}" in text and "device: CPU" in text
    assert all(line in text for line in printed)
    assert "| shape | image | image tokens |" in text


def test_oom_is_recorded_and_the_run_goes_on(monkeypatch, capsys, one_thread):
    """A rollout that runs out of memory marks its whole row OOM; an update that does marks the
    step and its peak OOM and the rollouts are still measured."""
    real_sample = bench.sampler.sample

    def sample(model, prompts, **kwargs):
        if prompts[0].image_grid_thw[0, 1] == 8:  # the 112 px rows
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_sample(model, prompts, **kwargs)

    def train_step(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench.sampler, "sample", sample)
    monkeypatch.setattr(bench, "train_step", train_step)
    rows = bench.main(["--shape", "tiny", "--repeats", "1", "--image-sizes", "56,112",
                       "--new-tokens", "4", "--prompts", "2", "--group-size", "2",
                       "--device", "cpu"])
    assert [(r["rollout_oom"], r["update_oom"]) for r in rows] == [(False, True), (True, False)]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    fine, oom = _cells(lines[0]), _cells(lines[1])
    assert fine[8] == "OOM" and fine[10].startswith("OOM / ")
    assert "without AdamW state" in fine[11]
    float(fine[7])
    assert oom[5:9] == ["OOM"] * 4 and oom[9].startswith("OOM / ")
