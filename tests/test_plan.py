"""plan.py: the arithmetic of a run against hand-computed figures, and the choices it makes."""

import json
import math

import pytest

import plan

H100 = "NVIDIA H100 80GB HBM3"
KEYS = ["depth", "params", "flops_per_token", "tokens", "total_batch_size", "device_batch_size", "grad_accum",
        "steps", "shards_needed", "shards_downloaded", "est_peak_mem_gib", "gpu_mem_gib", "est_hours", "est_cost_usd"]


def hand_scaling_params(depth, vocab=32768, width=None, head_dim=128):
    d = width or 64 * depth  # q, k, v, o (4 d^2) and the 4x MLP (8 d^2) per layer, plus the lm_head
    value_gates = (depth // 2) * (d // head_dim) * 12  # alternate layers: one 12-channel gate per kv head
    return 12 * depth * d * d + vocab * d + value_gates


@pytest.mark.parametrize("depth", [20, 24])
def test_tokens_batch_and_steps_follow_the_rules(depth):
    p = plan.make_plan(depth, 8, 8, H100)
    n = hand_scaling_params(depth)
    assert p["scaling_params"] == n
    batch = 2 ** round(math.log2(2**19 * (n / hand_scaling_params(12)) ** 0.383))
    assert p["total_batch_size"] == batch
    assert p["steps"] == round(8 * n / batch) and p["tokens"] == p["steps"] * batch
    assert p["lr_scale"] == (batch / 2**19) ** 0.5  # the run's rates and Muon decay: base_train's own rule
    assert p["muon_weight_decay"] == pytest.approx(0.28 * p["lr_scale"] * hand_scaling_params(12) / n)
    assert p["total_batch_size"] == p["device_batch_size"] * 2048 * 8 * p["grad_accum"]
    # hours = FLOPs / (GPUs x peak x MFU); cost = hours x GPUs x rate
    assert p["est_hours"] == pytest.approx(p["flops_per_token"] * p["tokens"] / (8 * 989.4e12 * 0.45) / 3600)
    assert p["est_cost_usd"] == pytest.approx(p["est_hours"] * 8 * 3.0)


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_enough_shards_are_downloaded(gpus):
    p = plan.make_plan(24, 8, gpus, H100)
    assert p["shards_downloaded"] >= p["shards_needed"] + 1  # + the validation shard
    usable_tokens = p["shards_needed"] * 270e6 / plan.CHARS_PER_TOKEN * (1 - plan.CROP_FRACTION)
    assert usable_tokens >= p["tokens"]


def test_device_batch_is_the_largest_that_fits():
    big, small = plan.make_plan(24, 8, 8, H100), plan.make_plan(24, 8, 1, "NVIDIA A100-SXM4-40GB")
    assert small["device_batch_size"] < big["device_batch_size"]
    for p in (big, small):
        assert p["fits"] and p["est_peak_mem_gib"] <= plan.MEMORY_MARGIN * p["gpu_mem_gib"] + 0.05
        model = plan.meta_model(24, 32768, 2048)
        twice = plan.estimate_peak_gib(model, 2 * p["device_batch_size"], 2048, p["gpus"])
        assert twice > plan.MEMORY_MARGIN * p["gpu_mem_gib"]  # the next size up would not fit


def test_a_run_that_cannot_fit_is_refused(tmp_path):
    p = plan.make_plan(24, 8, 1, "NVIDIA H100 80GB HBM3", gpu_mem=4.0)
    assert not p["fits"]
    assert any("does not fit" in line for line in plan.problems(p, tmp_path))


def test_pcie_and_unknown_cards():
    assert plan.find_gpu("NVIDIA H100 PCIe")[1] == 756.5e12  # not the SXM card's 989 TFLOP/s
    p = plan.make_plan(12, 8, 1, "Some Future GPU")
    assert not p["gpu_known"] and p["est_hours"] is None and not p["fits"]
    assert "unknown card" in plan.describe(p)


def test_json_has_the_documented_keys(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    plan.main(["--gpus", "8", "--gpu", H100, "--json"])
    out, err = capsys.readouterr()
    assert set(KEYS) <= set(json.loads(out)) and json.loads(out)["depth"] == 24
    assert "tokens:" in err  # the text for the person watching speedrun.sh, which reads the JSON
