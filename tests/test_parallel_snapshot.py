"""DCP snapshots: save at one layout, load at others, same parameters and the same next step."""

import pytest
import torch
import torch.distributed as dist

from densa.train.parallel.engine import EngineConfig, ParallelEngine
from densa.train.parallel.snapshot import latest_snapshot, load_snapshot, save_snapshot

from test_parallel_engine import make_batch, model_config, run_world


def gathered_parameters(engine: ParallelEngine) -> dict[str, torch.Tensor]:
    """Every parameter of the model, unsharded, collected from all stages onto every rank."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, engine.full_parameters())
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def save_and_reshard(directory: str) -> None:
    cfg = model_config()
    rows = 4

    def batch(step):
        return make_batch(rows, 16, cfg.vocab_size, seed=step)

    source = ParallelEngine(cfg, EngineConfig(dp=2, tp=2, microbatches=2, seq_len=16, warmup_steps=2))
    for step in range(2):
        source.train_step(batch(step))
    save_snapshot(source, directory)
    saved = gathered_parameters(source)
    expected_loss = source.train_step(batch(2)).loss
    expected_after = gathered_parameters(source)
    assert len(saved) == len(dict(source.modules[0].named_parameters()))

    targets = [
        EngineConfig(pp=2, tp=2, microbatches=4, seq_len=16, warmup_steps=2),
        EngineConfig(dp=4, microbatches=1, seq_len=16, warmup_steps=2),
        EngineConfig(dp=2, pp=2, microbatches=2, seq_len=16, warmup_steps=2, schedule="interleaved"),
    ]
    for config in targets:
        label = config.layout.name
        engine = ParallelEngine(cfg, config)
        step = load_snapshot(engine, latest_snapshot(directory))
        assert step == 2, f"{label}: resumed at step {step}"
        loaded = gathered_parameters(engine)
        assert loaded.keys() == saved.keys(), f"{label}: parameter names differ"
        for name in saved:
            assert torch.equal(loaded[name], saved[name]), f"{label}: {name} differs after loading"
        loss = engine.train_step(batch(2)).loss
        assert abs(loss - expected_loss) < 1e-5, f"{label}: next loss {loss} != {expected_loss}"
        after = gathered_parameters(engine)
        for name in saved:
            # Equal updates need the Adam moments and the lr schedule restored too.
            torch.testing.assert_close(after[name], expected_after[name], atol=1e-6, rtol=1e-5,
                                       msg=lambda m, name=name: f"{label}: {name} after one more step: {m}")


@pytest.mark.slow
def test_snapshot_reshards_across_layouts(tmp_path):
    run_world(4, save_and_reshard, str(tmp_path / "snapshots"))
