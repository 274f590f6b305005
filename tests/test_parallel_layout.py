"""ParallelLayout: degree validation, rank coordinates and model checks (the mesh itself is built in
test_parallel_engine.py's 8-process run)."""

import pytest

from densa.model.config import ModelConfig
from densa.train.parallel.layout import ParallelLayout


def test_world_size_defaults_to_product():
    layout = ParallelLayout(dp=2, tp=2, pp=2)
    assert layout.world_size == 8
    assert layout.name == "dp2-tp2-pp2"
    assert layout.enabled() == ["dp", "tp", "pp"]


def test_mismatched_world_size_rejected():
    with pytest.raises(ValueError, match="does not match the world size 6"):
        ParallelLayout(dp=2, tp=2, pp=2, world_size=6)


@pytest.mark.parametrize("degree", [0, -1, 1.5, True])
def test_invalid_degree_rejected(degree):
    with pytest.raises(ValueError, match="tp="):
        ParallelLayout(tp=degree)


def test_infer_fills_dp():
    assert ParallelLayout.infer(16, tp=2, pp=4).dp == 2
    with pytest.raises(ValueError, match="not divisible"):
        ParallelLayout.infer(6, tp=4)


def test_only_enabled_parallelisms_listed():
    assert ParallelLayout(tp=4).enabled() == ["tp"]
    assert ParallelLayout().enabled() == []


def test_coordinates_row_major_pp_dp_tp():
    layout = ParallelLayout(dp=2, tp=2, pp=2)
    assert layout.coordinates(0) == {"pp": 0, "dp": 0, "tp": 0}
    assert layout.coordinates(1) == {"pp": 0, "dp": 0, "tp": 1}
    assert layout.coordinates(2) == {"pp": 0, "dp": 1, "tp": 0}
    assert layout.coordinates(5) == {"pp": 1, "dp": 0, "tp": 1}
    seen = {tuple(layout.coordinates(r).values()) for r in range(8)}
    assert len(seen) == 8
    with pytest.raises(ValueError, match="outside"):
        layout.coordinates(8)


def test_check_model_tp_must_divide_heads():
    config = ModelConfig(vocab_size=64, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=128, attention="dense")
    ParallelLayout(tp=4).check_model(config)
    with pytest.raises(ValueError, match="n_kv_heads=4"):
        ParallelLayout(tp=8).check_model(config)


def test_check_model_pp_needs_enough_layers():
    config = ModelConfig(vocab_size=64, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=128, attention="dense")
    ParallelLayout(pp=4).check_model(config)
    with pytest.raises(ValueError, match="at least 8 layers"):
        ParallelLayout(pp=4).check_model(config, virtual_stages=2)


def test_check_model_accepts_density_with_model_parallelism():
    config = ModelConfig(vocab_size=64, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=128, attention="density")
    ParallelLayout(dp=2, tp=2, pp=2).check_model(config, virtual_stages=2)
