"""Data-parallel alignment training against one process (gloo, real processes on 127.0.0.1).

Two ranks with local batch B must end with the same parameters, EMA key
encoder and queues as one process with global batch 2B on the same data
order, for each contrastive variant.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from densa.cli import main as cli_main
from densa.data.tokenizer import DensaTokenizer
from densa.io import InputError
from densa.multimodal.data import CaptionTokens, PairDataset
from densa.multimodal.encoder import tiny
from densa.multimodal.heads import AlignModel
from densa.multimodal.moco import ContrastConfig
from densa.multimodal.train import TrainConfig, load_checkpoint, train_align

from test_parallel_engine import free_port

GLOBAL_BATCH = 8
STEPS = 4
# fp32 on CPU: the two runs differ only in the batch shapes of each matmul.
ATOL, RTOL = 1e-5, 1e-5
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
COLOURS_ZH = ["红", "绿", "蓝", "黄", "黑", "白"]
SHAPES = ["circle", "square", "star", "heart"]
SHAPES_ZH = ["圆", "方块", "星", "心"]


def pair_dataset() -> PairDataset:
    """Return 24 random 16 x 16 images, each with an English and a Chinese caption."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), generator=generator, dtype=torch.uint8)
    captions, caption_image, caption_lang = [], [], []
    for i in range(24):
        colour, shape = i % len(COLOURS), i // len(COLOURS)
        english = f"{COLOURS[colour]} {SHAPES[shape]}"
        chinese = f"{COLOURS_ZH[colour]}{SHAPES_ZH[shape]}"
        for lang, text in (("en", english), ("zh", chinese)):
            captions.append(text)
            caption_image.append(i)
            caption_lang.append(lang)
    return PairDataset(images, [str(i) for i in range(24)], captions, torch.tensor(caption_image), caption_lang)


# name -> ContrastConfig fields
VARIANTS = {"in_batch": {"method": "in_batch"}, "moco_queue": {"method": "moco_queue"},
            "moco_queue_learned_temperature": {"method": "moco_queue", "learn_temperature": True}}


def build(variant: str):
    dataset = pair_dataset()
    tokenizer = DensaTokenizer.train(dataset.captions, 300)
    torch.manual_seed(0)
    model = AlignModel(tiny(vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64, n_heads=2, n_kv_heads=2,
                            text_head_dim=48, image_head_dim=80, embed_dim=16, image_size=16, patch_size=8))
    tokens = CaptionTokens(dataset.captions, tokenizer, model.config.max_text_len)
    # Queue 12 < 2 steps x 8 keys, so the queue wraps. With 24 images / 8 = 3 steps per epoch,
    # step 4 revisits items whose keys are still queued.
    contrast = ContrastConfig(queue_size=12, momentum=0.9, **VARIANTS[variant])
    config = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH, lr=1e-3, warmup_steps=2, seed=3, log_every=1)
    return model, contrast, config, dataset, tokens


def run_training(variant: str, batch_size: int = GLOBAL_BATCH) -> dict[str, torch.Tensor]:
    """Train for STEPS steps; return every parameter, weight-average parameter and queue entry, and the losses."""
    model, contrast, config, dataset, tokens = build(variant)
    config = TrainConfig(**{**config.__dict__, "batch_size": batch_size})
    result = train_align(model, contrast, config, dataset, tokens)
    state = {f"model.{name}": value.detach().clone() for name, value in model.state_dict().items()}
    state.update({f"average.{name}": value.clone() for name, value in result.average_model.state_dict().items()})
    if result.momentum_model is not None:
        assert result.momentum_model is result.average_model
        for modality in ("text", "image"):
            keys, ids = getattr(result.aligner, f"{modality}_queue").ordered()
            state[f"queue.{modality}.keys"], state[f"queue.{modality}.ids"] = keys.clone(), ids.clone()
    state["losses"] = torch.tensor(result.losses)
    return state


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {variant: run_training(variant) for variant in VARIANTS}
        try:
            run_training("in_batch", batch_size=GLOBAL_BATCH - 1)
        except InputError as err:
            results["odd_batch_error"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks leave together, so neither tears gloo down under the other.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("align_ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_match_one_process(two_ranks, variant):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = run_training(variant)
    finally:
        torch.set_num_threads(threads)
    n_model = sum(name.startswith("model.") for name in expected)
    n_average = sum(name.startswith("average.") for name in expected)
    assert n_average == n_model
    for rank, results in enumerate(two_ranks):
        got = results[variant]
        assert sorted(got) == sorted(expected), f"rank {rank}: different state names"
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=ATOL, rtol=RTOL,
                                       msg=lambda m, name=name: f"{variant} rank {rank} {name}: {m}")


def test_training_moves_parameters(two_ranks):
    # Guards the comparison above against a run that never updates anything.
    model, *_ = build("in_batch")
    initial = model.state_dict()
    trained = two_ranks[0]["in_batch"]
    changed = [name for name, value in initial.items() if not torch.equal(trained[f"model.{name}"], value)]
    assert len(changed) > len(initial) // 2


def test_on_step_runs_after_each_update():
    model, contrast, config, dataset, tokens = build("in_batch")
    first = next(model.parameters())
    seen = [(-1, first.detach().clone())]
    # Each call comes after the optimizer step, so the weights it gets differ from the previous call's.
    train_align(model, contrast, config, dataset, tokens,
                on_step=lambda step: seen.append((step, first.detach().clone())))
    assert [step for step, _ in seen] == list(range(-1, STEPS))
    for (_, before), (step, after) in zip(seen, seen[1:]):
        assert not torch.equal(before, after), f"weights unchanged at step {step}"


def test_in_batch_keeps_weight_average():
    model, contrast, config, dataset, tokens = build("in_batch")
    decay = contrast.momentum
    expected = [p.detach().clone() for p in model.parameters()]

    def update(step: int) -> None:
        for average, param in zip(expected, model.parameters()):
            average.mul_(decay).add_(param.detach(), alpha=1 - decay)

    result = train_align(model, contrast, config, dataset, tokens, on_step=update)
    assert result.momentum_model is None
    for average, want in zip(result.average_model.parameters(), expected):
        torch.testing.assert_close(average, want)
    moved = [not torch.equal(a, p) for a, p in zip(result.average_model.parameters(), model.parameters())]
    assert sum(moved) > len(moved) // 2


def test_uneven_batch_is_rejected(two_ranks):
    for results in two_ranks:
        message = results["odd_batch_error"]
        assert "batch size 7" in message
        assert "multiple of 2" in message


# -- `densa align train --nproc 2` ------------------------------------------------------------------------------


def write_folder(root: Path) -> Path:
    """Write pair_dataset() as a captions.jsonl folder of PNG files."""
    dataset = pair_dataset()
    root.mkdir()
    lines = []
    for i in range(len(dataset)):
        Image.fromarray(dataset.images[i].permute(1, 2, 0).numpy()).save(root / f"{i}.png")
        captions = [dataset.captions[c] for c in range(len(dataset.captions)) if dataset.caption_image[c] == i]
        lines.append(json.dumps({"file_name": f"{i}.png", "captions": captions}, ensure_ascii=False))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def train_argv(data: Path, out: Path) -> list[str]:
    return ["align", "train", "--data", str(data), "--out", str(out), "--image-size", "16", "--patch-size", "8",
            "--embed-dim", "16", "--text-head-dim", "32", "--image-head-dim", "32", "--vocab-size", "300",
            "--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--eval-fraction", "0.25",
            "--queue-size", "16", "--momentum", "0.9", "--lr", "1e-3"]


def test_cli_nproc_2_matches_one_process(tmp_path):
    data = write_folder(tmp_path / "data")
    assert cli_main(train_argv(data, tmp_path / "parallel") + ["--nproc", "2"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(train_argv(data, tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(threads)

    parallel_model, _, parallel_config = load_checkpoint(tmp_path / "parallel")
    single_model, _, single_config = load_checkpoint(tmp_path / "single")
    assert parallel_config["world_size"] == 2
    assert single_config["world_size"] == 1
    # Both saved the EMA key encoder, so this also checks that it stays in step across ranks.
    assert parallel_config["weights"] == "ema"
    assert single_config["weights"] == "ema"
    assert parallel_config["train"]["batch_size"] == 8
    for (name, value), expected in zip(parallel_model.state_dict().items(), single_model.state_dict().values()):
        torch.testing.assert_close(value, expected, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"{name}: {m}")
    # Only rank 0 wrote, and nothing is left half-written next to the checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "parallel", "single"]


def test_cli_nproc_uneven_batch_exits_2(tmp_path, capsys):
    rc = cli_main(["align", "train", "--out", str(tmp_path / "out"), "--nproc", "2", "--batch-size", "7"])
    assert rc == 2
    assert "--batch-size 7" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_nproc_inside_torchrun_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = cli_main(["align", "train", "--out", str(tmp_path / "out"), "--nproc", "2", "--batch-size", "8"])
    assert rc == 2
    assert "already" in capsys.readouterr().err
