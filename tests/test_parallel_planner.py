"""The analytic planner and `densa plan`: hand-computed formulas, constraints, ranking and the CLI."""

import json
import math

import pytest

from densa.cli import main
from densa.train.parallel.planner import (
    PlanRequest,
    bubble_fraction,
    candidate_layouts,
    derive_shape,
    estimate,
    model_flops,
    plan,
    ring_allreduce_bytes,
)


def request(**changes) -> PlanRequest:
    values = dict(params=1e9, gpus=16, gpu="a100-80g", seq=2048, global_batch=64, layers=16, hidden=2048,
                  heads=16, vocab=32000, efficiency=0.5)
    values.update(changes)
    return PlanRequest(**values)


def test_bubble_formula_1f1b_and_interleaved():
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction(8, 32, virtual_stages=2) == pytest.approx(7 / 71)
    assert bubble_fraction(1, 4) == 0


def test_ring_allreduce_volume():
    assert ring_allreduce_bytes(1000, 4) == pytest.approx(1500)
    assert ring_allreduce_bytes(1000, 1) == 0


def test_model_flops_megatron_formula():
    r = request()
    B, s, L, h, V = 64, 2048, 16, 2048, 32000
    expected = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert model_flops(r) == pytest.approx(expected)
    assert model_flops(r, recompute=True) / model_flops(r) == pytest.approx(
        96 * (1 + s / (6 * h) + V / (16 * L * h)) / (72 * (1 + s / (6 * h) + V / (12 * L * h)))
    )


def test_memory_hand_computed_ddp_selective():
    r = request(sharding="ddp", recompute="selective")
    e = estimate(r, dp=2, tp=2, pp=4, microbatch_size=1)
    h, L, V, s = 2048, 16, 32000, 2048
    params_per_gpu = ((L // 4) * 12 * h * h + V * h) / 2
    model_state = 16 * params_per_gpu
    m = 64 // 2
    activations = s * h * (10 + 24 / 2) * (L // 4) * min(m, 4) + 4 * s * V / 2
    assert e.microbatches == m
    assert e.model_state_gib * 2**30 == pytest.approx(model_state)
    assert e.activation_gib * 2**30 == pytest.approx(activations)
    assert e.bubble_fraction == pytest.approx(3 / (m + 3))


def test_fsdp_shards_model_states_by_dp():
    ddp = estimate(request(sharding="ddp"), dp=4, tp=1, pp=4, microbatch_size=1)
    fsdp = estimate(request(sharding="fsdp"), dp=4, tp=1, pp=4, microbatch_size=1)
    layer = 12 * 2048 * 2048
    assert fsdp.model_state_gib * 2**30 == pytest.approx(ddp.model_state_gib * 2**30 / 4 + 4 * layer)


def test_step_time_adds_bubble_and_comm():
    r = request()
    e = estimate(r, dp=2, tp=2, pp=4, microbatch_size=2)
    ideal = model_flops(r) / (16 * 312e12 * 0.5)
    assert e.compute_s == pytest.approx(ideal / (1 - e.bubble_fraction))
    assert e.step_s == pytest.approx(e.compute_s + e.comm_s)
    assert 0 < e.comm_fraction < 1


def test_candidates_respect_constraints():
    r = request(gpus=64, heads=12, hidden=1536, layers=24)
    candidates = list(candidate_layouts(r))
    assert candidates
    for dp, tp, pp, b, v in candidates:
        assert dp * tp * pp == 64
        assert tp <= 8
        assert 12 % tp == 0
        assert 24 % (pp * v) == 0
        assert 64 % (dp * b) == 0
        if v > 1:
            assert (64 // (dp * b)) % pp == 0
    assert (8, 8, 1, 1, 1) not in candidates  # 12 heads do not split 8 ways


def test_plan_ranks_fitting_layouts_first():
    estimates = plan(request(params=70e9, layers=80, hidden=8192, heads=64, gpus=64, global_batch=256))
    fits = [e.fits for e in estimates]
    assert True in fits
    assert False in fits
    assert fits == sorted(fits, reverse=True)
    fitting = [e.step_s for e in estimates if e.fits]
    assert fitting == sorted(fitting)


def test_derived_shape_near_params():
    hidden, layers = derive_shape(70e9)
    assert hidden % 1024 == 0
    assert layers % 8 == 0
    assert math.isclose(12 * layers * hidden**2, 70e9, rel_tol=0.1)


def test_request_rejects_bad_values():
    with pytest.raises(ValueError, match="gpu="):
        request(gpu="tpu-v9")
    with pytest.raises(ValueError, match="efficiency"):
        request(efficiency=1.5)
    with pytest.raises(ValueError, match="params"):
        request(params=0)


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--params", "70e9", "--gpus", "256", "--gpu", "a100-80g", "--seq", "4096",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "312 TFLOP/s" in printed
    assert "datasheet" in printed
    record = json.loads(out.read_text())
    assert record["assumptions"]["peak_tflops_bf16"] == 312.0
    first = record["layouts"][0]
    for key in ("layout", "dp", "tp", "pp", "microbatches", "memory_gib", "step_s", "comm_fraction",
                "bubble_fraction", "fits"):
        assert key in first
    assert first["dp"] * first["tp"] * first["pp"] == 256


def test_cli_bad_input_exits_2(capsys):
    assert main(["plan", "--params", "70e9", "--gpus", "0"]) == 2
    assert "gpus=0" in capsys.readouterr().err
