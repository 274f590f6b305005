"""Load balancer: the update rule, apportioning, and exact gradients with unequal local batches."""

import pytest

from densa.train.parallel.balancer import LoadBalancer, apportion
from densa.train.parallel.engine import EngineConfig

from test_parallel_density import SEQ_LEN, SMALL_CLIP, density_config, make_batches
from test_parallel_engine import check_layout, make_batch, model_config, run_world


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


class FakeClock:
    """A clock that only the emulated device's waits move: real computing takes no time on it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def emulated_device_busy_time() -> None:
    """Two replicas on an emulated device, the second one 2x slower: busy seconds on a fake clock, by hand."""
    import densa.train.parallel.engine as engine_module
    import densa.train.parallel.pipeline as pipeline_module
    from densa.train.parallel.engine import ParallelEngine

    clock = FakeClock()
    engine_module.time = pipeline_module.time = clock
    engine_module.emulate_device_time = clock.sleep
    cfg = model_config()  # 4 blocks
    row_s = 1e-3
    # Per block and row: forward 1 ms, backward 2 ms. dp = 2 with 3 rows each: 4 x 3 x 3 ms = 36 ms on the
    # normal replica, 72 ms on the slowed one.
    engine = ParallelEngine(cfg, EngineConfig(dp=2, microbatches=3, seq_len=16, emulated_device_s=row_s,
                                              slowdown=2.0, slow_replica=1))
    _, busy = engine.forward_backward(make_batch(6, 16, cfg.vocab_size, seed=0))
    assert busy == pytest.approx(4 * 3 * 3 * row_s * (2 if engine.dp_rank == 1 else 1))
    # tp = 2 keeps the blocks back to back (FSDP would put its own autograd node between them), so
    # the total also shows that a block's backward window closes before the previous block's opens.
    engine = ParallelEngine(cfg, EngineConfig(tp=2, microbatches=3, seq_len=16, emulated_device_s=row_s))
    _, busy = engine.forward_backward(make_batch(3, 16, cfg.vocab_size, seed=0))
    assert busy == pytest.approx(4 * 3 * 3 * row_s)
    # pp = 2: each rank has 2 blocks and runs 5 one-row micro-batches; the chunk timers see the block waits.
    engine = ParallelEngine(cfg, EngineConfig(pp=2, microbatches=5, seq_len=16, emulated_device_s=row_s))
    _, busy = engine.forward_backward(make_batch(5, 16, cfg.vocab_size, seed=0))
    assert busy == pytest.approx(2 * 5 * 3 * row_s)


def test_emulated_device_waits_per_block_and_row():
    run_world(2, emulated_device_busy_time)


def test_config_rejects_bad_emulation_and_dtype():
    with pytest.raises(ValueError, match="emulated_device_s=-1"):
        EngineConfig(emulated_device_s=-1)
    with pytest.raises(ValueError, match="dtype='fp16' is invalid"):
        EngineConfig(dtype="fp16")
