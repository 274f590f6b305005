"""Single-process training on real text: loss falls, resume is exact, checkpoints load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densa.data.readers import read_govreport
from densa.density.plan import PlanConfig
from densa.model.config import ModelConfig
from densa.train.checkpoint import load_model, save_checkpoint
from densa.train.recipe import prepare_data
from densa.train.trainer import TrainConfig, Trainer, batch_indices, lr_factor, token_loss
from densa.model.llama import Transformer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GOVREPORT = DATA / "longdoc" / "govreport" / "gov_report_summ.jsonl"
PLAN = PlanConfig(block_size=16, near_window=(16, 32), far_window=(8, 16), near_tokens=32, far_tokens=96,
                  max_dense_fraction=0.1)


@pytest.fixture(scope="module")
def govreport_data():
    if not GOVREPORT.exists():
        pytest.skip(f"real data not found at {GOVREPORT}")
    documents = read_govreport(GOVREPORT)
    return prepare_data(documents, seq_len=128, vocab_size=1024, val_fraction=0.2, seed=0)


def model_config(vocab_size: int, attention: str = "density") -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                       max_seq_len=256, attention=attention, window=24, plan=PLAN)


def make_trainer(data, config: TrainConfig, attention: str = "density", out_dir=None) -> Trainer:
    torch.manual_seed(config.seed)
    model = Transformer(model_config(data.tokenizer.vocab_size, attention))
    return Trainer(model, data.train, config, data.val, out_dir, data.tokenizer.to_json())


@pytest.mark.parametrize("attention", ["dense", "density"])
def test_loss_falls_on_real_text(govreport_data, attention):
    config = TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=3, progress=False)
    trainer = make_trainer(govreport_data, config, attention)
    result = trainer.fit()
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert result.val_ppl < govreport_data.tokenizer.vocab_size / 2


def test_resume_continues_exactly(govreport_data, tmp_path):
    config = TrainConfig(steps=8, batch_size=2, warmup_steps=2, progress=False)
    uninterrupted = make_trainer(govreport_data, config)
    uninterrupted.fit()

    first_half = make_trainer(govreport_data, config, out_dir=tmp_path)
    first_half.fit(until=4)
    resumed = make_trainer(govreport_data, TrainConfig(**{**config.to_dict(), "seed": 0}))
    resumed.resume(tmp_path / "checkpoint")
    assert resumed.step == 4
    resumed.fit()

    assert resumed.losses == uninterrupted.losses
    for a, b in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(a, b)


def test_bf16_autocast_trains(govreport_data):
    config = TrainConfig(steps=3, batch_size=2, dtype="bf16", progress=False)
    result = make_trainer(govreport_data, config, "dense").fit()
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_checkpoint_round_trip(tmp_path):
    model = Transformer(model_config(50))
    save_checkpoint(tmp_path / "ckpt", model, {"steps": 1})
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    # Overwriting leaves exactly one checkpoint folder and no temporary ones.
    save_checkpoint(tmp_path / "ckpt", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_schedule_and_batches_hand_computed():
    config = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(110, config) == pytest.approx(0.1)
    # Batches walk a permutation, then a new one: every index once per epoch.
    seen = torch.cat([batch_indices(step, 10, 4, seed=3) for step in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:20].tolist()) == list(range(10))


def test_token_loss_is_sum_and_count():
    logits = torch.zeros(1, 2, 4)
    loss, count = token_loss(logits, torch.tensor([[0, 3]]))
    assert count == 2
    assert float(loss) == pytest.approx(2 * torch.log(torch.tensor(4.0)).item())


@pytest.mark.parametrize(
    "changes, fragment",
    [({"steps": 0}, "steps=0"), ({"lr": -1.0}, "lr=-1.0"), ({"dtype": "fp8"}, "dtype='fp8'"),
     ({"min_lr_ratio": 2.0}, "min_lr_ratio=2.0")],
)
def test_invalid_train_config_rejected(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**changes)


def test_resume_without_trainer_state_rejected(govreport_data, tmp_path):
    trainer = make_trainer(govreport_data, TrainConfig(steps=2, progress=False))
    save_checkpoint(tmp_path / "weights-only", trainer.model)
    with pytest.raises(ValueError, match="no trainer state"):
        trainer.resume(tmp_path / "weights-only")
