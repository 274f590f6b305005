"""Load balancer: the update rule, apportioning, and exact gradients with unequal local batches."""

import pytest

from densa.model.config import ModelConfig
from densa.train.parallel.balancer import LoadBalancer, apportion
from densa.train.parallel.engine import EngineConfig

from test_parallel_density import SEQ_LEN, SMALL_CLIP, density_config, make_batches
from test_parallel_engine import check_layout, model_config, run_world


def test_apportion_keeps_total_and_minimum():
    assert apportion([1, 1, 1, 1], 8) == [2, 2, 2, 2]
    assert apportion([2, 2, 2, 1], 28) == [8, 8, 8, 4]
    assert apportion([100, 1], 4) == [3, 1]
    assert sum(apportion([0.3, 0.5, 0.2], 17)) == 17


def test_apportion_rejects_too_few_units():
    with pytest.raises(ValueError, match="at least 1"):
        apportion([1, 1, 1], 2)


def test_update_rule_grows_idle_and_shrinks_busy():
    balancer = LoadBalancer(total_units=40, n_workers=4, target=0.9)
    assert balancer.split == [10, 10, 10, 10]
    # 0.5 < 0.8 x 0.9: more work; 1.0 is inside [0.72, 1.08]: unchanged; 1.2 > 1.08: less work.
    balancer.update([0.5, 1.0, 0.9, 1.2])
    raw = [1.2, 1.0, 1.0, 0.8]
    assert balancer.weights == pytest.approx([w / sum(raw) for w in raw])
    assert balancer.split == [12, 10, 10, 8]
    assert sum(balancer.split) == 40


def test_update_converges_to_proportional_split():
    # Worker 3 takes twice as long per unit; utilisation = own compute / slowest worker's compute.
    balancer = LoadBalancer(total_units=28, n_workers=4)
    cost = [1.0, 1.0, 1.0, 2.0]
    for _ in range(30):
        times = [c * s for c, s in zip(cost, balancer.split)]
        balancer.update([t / max(times) for t in times])
    assert balancer.split == [8, 8, 8, 4]


def test_set_split_validates():
    balancer = LoadBalancer(total_units=8, n_workers=2)
    balancer.set_split([6, 2])
    assert balancer.offsets() == [0, 6]
    with pytest.raises(ValueError, match="summing to 8"):
        balancer.set_split([5, 2])


def test_state_dict_round_trip_and_new_dp():
    balancer = LoadBalancer(total_units=12, n_workers=3)
    balancer.set_split([6, 4, 2])
    restored = LoadBalancer(total_units=12, n_workers=3)
    restored.load_state_dict(balancer.state_dict())
    assert restored.split == [6, 4, 2]
    other = LoadBalancer(total_units=12, n_workers=2)
    other.load_state_dict(balancer.state_dict())
    assert other.split == [6, 6]


def unequal_batches(density_batches) -> None:
    """Four processes: dp4 with unequal rows, then dp2 x pp2 with unequal micro-batch counts, dense and density."""
    cfg = model_config()
    check_layout(cfg, EngineConfig(dp=4, microbatches=2, seq_len=16), split=[1, 2, 4, 1])
    check_layout(cfg, EngineConfig(dp=2, pp=2, microbatches=4, seq_len=16), split=[6, 2])
    check_layout(density_config(), EngineConfig(dp=2, pp=2, microbatches=4, seq_len=SEQ_LEN, grad_clip=SMALL_CLIP),
                 split=[6, 2], batches=density_batches)


@pytest.mark.slow
def test_unequal_local_batches_give_exact_gradients():
    run_world(4, unequal_batches, make_batches(rows=8, steps=2))
