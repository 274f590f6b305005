"""Tests for densa.multimodal: shared encoder, heads, queue, momentum, InfoNCE, metrics, index, training."""

from __future__ import annotations

import datetime
import json
import math
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
from densa.multimodal import data as data_module
from densa.multimodal.encoder import AlignConfig, tiny
from densa.multimodal.heads import AlignModel
from densa.multimodal.index import RetrievalIndex
from densa.multimodal.loss import info_nce, symmetric_info_nce
from densa.multimodal.metrics import (
    chance_levels,
    image_to_text_ranks,
    matching_accuracy,
    retrieval_metrics,
    text_to_image_ranks,
)
from densa.multimodal.moco import ContrastConfig, ContrastiveAligner, EmbeddingQueue, momentum_update
from densa.multimodal.train import TrainConfig, load_checkpoint, lr_factor, save_checkpoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: on shared, busy cores two intra-op threads run many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_model(seed: int = 0) -> AlignModel:
    torch.manual_seed(seed)
    return AlignModel(tiny(vocab_size=64, dim=32, ffn_dim=64, n_heads=2, n_kv_heads=2, text_head_dim=48,
                           image_head_dim=80, embed_dim=16, image_size=16, patch_size=8))


def _batch(B: int = 4, T: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (B, T), generator=generator)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    pixels = torch.randn(B, 3, 16, 16, generator=generator)
    return tokens, mask, pixels, torch.arange(B)


# -- loss ------------------------------------------------------------------------------------------------------


def test_info_nce_hand_computed():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # Logits at temperature 0.1: query 0 -> [10, 0, 6], query 1 -> [0, 10, 8].
    expected_0 = -10 + math.log(math.exp(10) + math.exp(0) + math.exp(6))
    expected_1 = -10 + math.log(math.exp(0) + math.exp(10) + math.exp(8))
    loss = info_nce(queries, keys, torch.tensor([0, 1]), 0.1)
    assert loss.item() == pytest.approx((expected_0 + expected_1) / 2, rel=1e-6)


def test_info_nce_key_mask_drops_keys():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    key_mask = torch.tensor([[True, True, False], [True, True, True]])
    expected_0 = -10 + math.log(math.exp(10) + math.exp(0))
    expected_1 = -10 + math.log(math.exp(0) + math.exp(10) + math.exp(8))
    loss = info_nce(queries, keys, torch.tensor([0, 1]), 0.1, key_mask)
    assert loss.item() == pytest.approx((expected_0 + expected_1) / 2, rel=1e-6)


def test_symmetric_info_nce_directions():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    targets = torch.tensor([0, 1])
    t2i, i2t = symmetric_info_nce(text, image, image, text, targets, 0.5)
    assert t2i.item() == pytest.approx(info_nce(text, image, targets, 0.5).item())
    assert i2t.item() == pytest.approx(info_nce(image, text, targets, 0.5).item())
    assert t2i.item() != pytest.approx(i2t.item())


# -- queue and momentum ----------------------------------------------------------------------------------------


def test_queue_enqueues_in_order_and_wraps():
    queue = EmbeddingQueue(size=5, dim=1)

    def push(*values):
        keys = torch.tensor(values, dtype=torch.float32)[:, None]
        queue.enqueue(keys, torch.tensor(values, dtype=torch.long))

    assert queue.keys().shape == (0, 1)
    push(1, 2, 3)
    assert queue.ids().tolist() == [1, 2, 3]
    push(4, 5, 6)  # wraps: 6 overwrites the oldest entry, 1
    keys, ids = queue.ordered()
    assert ids.tolist() == [2, 3, 4, 5, 6]
    assert keys.flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert queue.ids().tolist() == [6, 2, 3, 4, 5]  # raw slots
    push(7, 8, 9, 10, 11, 12, 13)  # more than the queue holds: only the newest 5 stay
    assert queue.ordered()[1].tolist() == [9, 10, 11, 12, 13]
    assert int(queue.filled) == 5


def test_momentum_update_formula():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    momentum_update(online, target, 0.9)
    for old, new, source in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source.detach())
    momentum_update(online, target, 0.0)
    for new, source in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(new, source.detach())


def test_aligner_momentum_model_tracks_ema_and_queue_fills():
    model = _small_model()
    aligner = ContrastiveAligner(model, ContrastConfig(queue_size=6, momentum=0.5))
    before = [p.detach().clone() for p in aligner.momentum_model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    loss, _ = aligner(*_batch())
    loss.backward()
    optimizer.step()
    assert not any(p.requires_grad for p in aligner.momentum_model.parameters())
    assert aligner.image_queue.ids().tolist() == [0, 1, 2, 3]

    # The second step's EMA uses the online weights after the optimizer step.
    online = [p.detach().clone() for p in model.parameters()]
    loss, _ = aligner(*_batch(seed=2))
    for old, new, source in zip(before, aligner.momentum_model.parameters(), online):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * source)
    assert aligner.text_queue.ordered()[1].tolist() == [2, 3, 0, 1, 2, 3]


def test_moco_loss_uses_queue_negatives():
    model = _small_model()
    aligner = ContrastiveAligner(model, ContrastConfig(queue_size=64, momentum=0.0))
    tokens, mask, pixels, ids = _batch()
    with torch.no_grad():
        first, _ = aligner(tokens, mask, pixels, ids)
        # Same batch under new ids: the queued keys now count as negatives.
        second, _ = aligner(tokens, mask, pixels, ids + 100)
        text = model.embed_text(tokens, mask)
        image = model.embed_image(pixels)
    keys_t, keys_i = torch.cat([text, text]), torch.cat([image, image])
    targets = torch.arange(4)
    expected = (info_nce(text, keys_i, targets, 0.1) + info_nce(image, keys_t, targets, 0.1)) / 2
    torch.testing.assert_close(second, expected)
    assert second > first


def test_queue_drops_own_item_keys():
    model = _small_model()
    aligner = ContrastiveAligner(model, ContrastConfig(queue_size=64, momentum=0.0))
    tokens, mask, pixels, ids = _batch()
    with torch.no_grad():
        aligner(tokens, mask, pixels, ids)
        # The queue now contains keys of items 0-3. Each query keeps the other items' copies but not its own.
        loss, stats = aligner(tokens, mask, pixels, ids)
        text = model.embed_text(tokens, mask)
        image = model.embed_image(pixels)

    def expected(queries, keys):
        logits = queries @ keys.T / 0.1  # [B, B]
        positive = logits.diagonal()
        negatives = logits.exp().sum(dim=1) - positive.exp()
        return (-(positive - torch.log(positive.exp() + 2 * negatives))).mean()

    torch.testing.assert_close(torch.tensor(stats["loss_t2i"]), expected(text, image))
    torch.testing.assert_close(torch.tensor(stats["loss_i2t"]), expected(image, text))


def test_in_batch_loss_matches_clip():
    model = _small_model()
    aligner = ContrastiveAligner(model, ContrastConfig(method="in_batch"))
    tokens, mask, pixels, ids = _batch()
    loss, _ = aligner(tokens, mask, pixels, ids)
    text, image = model.embed_text(tokens, mask), model.embed_image(pixels)
    logits = text @ image.T / 0.1
    targets = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, targets)
                + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(loss, expected)


def test_learned_temperature_gets_gradient():
    model = _small_model()
    aligner = ContrastiveAligner(model, ContrastConfig(method="in_batch", learn_temperature=True))
    loss, stats = aligner(*_batch())
    loss.backward()
    assert stats["temperature"] == pytest.approx(0.1)
    assert aligner.log_temperature.grad is not None
    assert aligner.log_temperature.grad.abs().item() > 0


@pytest.mark.parametrize(
    "changes, fragment",
    [({"method": "siglip"}, "method="), ({"queue_size": 0}, "queue_size="), ({"momentum": 1.0}, "momentum="),
     ({"temperature": 0.0}, "temperature=")],
)
def test_contrast_config_rejects_bad_values(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        ContrastConfig(**changes)


# -- encoder and heads -----------------------------------------------------------------------------------------


def test_encoder_blocks_shared_between_modalities():
    model = _small_model()
    tokens, mask, pixels, _ = _batch()
    calls = {"text": [], "image": []}
    current = []
    hooks = [layer.register_forward_hook(lambda module, args, out: current[-1].append(module))
             for layer in model.encoder.layers.values()]
    current.append(calls["text"])
    model.embed_text(tokens, mask)
    current.append(calls["image"])
    model.embed_image(pixels)
    for hook in hooks:
        hook.remove()
    assert len(calls["text"]) == model.config.n_layers
    assert all(a is b for a, b in zip(calls["text"], calls["image"]))


@pytest.mark.parametrize("modality", ["text", "image"])
def test_encoder_blocks_get_gradient_from_each_modality(modality):
    model = _small_model()
    tokens, mask, pixels, _ = _batch()
    out = model.embed_text(tokens, mask) if modality == "text" else model.embed_image(pixels)
    out.sum().backward()
    for name, param in model.encoder.layers.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Only the entry point and head of the modality used get gradients.
    text_grad = model.encoder.tok_embeddings.weight.grad
    image_grad = model.encoder.patch_embed.weight.grad
    assert (text_grad is not None) == (modality == "text")
    assert (image_grad is not None) == (modality == "image")
    assert (model.text_head.fc1.weight.grad is not None) == (modality == "text")
    assert (model.image_head.fc1.weight.grad is not None) == (modality == "image")
    assert model.encoder.modality_embed.weight.grad is not None


def test_encoder_ignores_padding():
    model = _small_model()
    tokens = torch.tensor([[5, 9, 11, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False, False, False]])
    padded = model.embed_text(tokens, mask)
    garbage = model.embed_text(torch.tensor([[5, 9, 11, 40, 41, 42]]), mask)
    alone = model.embed_text(tokens[:, :3], mask[:, :3])
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(garbage, alone)


def test_heads_output_unit_vectors_of_embed_dim():
    model = _small_model()
    tokens, mask, pixels, _ = _batch()
    text, image = model.embed_text(tokens, mask), model.embed_image(pixels)
    assert text.shape == image.shape == (4, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    assert model.text_head.fc1.out_features == 48
    assert model.image_head.fc1.out_features == 80


def test_default_head_widths_differ_by_modality():
    config = AlignConfig()
    assert (config.text_head_dim, config.image_head_dim) == (768, 1024)


@pytest.mark.parametrize(
    "changes, fragment",
    [({"image_size": 30}, "patch_size"), ({"dim": 0}, "dim="), ({"n_heads": 3}, "divisible"),
     ({"embed_dim": 1.5}, "embed_dim=")],
)
def test_align_config_rejects_bad_values(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        AlignConfig(**changes)


def test_encoder_rejects_wrong_image_size():
    model = _small_model()
    with pytest.raises(ValueError, match="resize"):
        model.embed_image(torch.zeros(1, 3, 32, 32))


# -- metrics ---------------------------------------------------------------------------------------------------


def test_retrieval_metrics_known_matrix():
    # Rows: captions, columns: images. Caption i belongs to image i.
    similarity = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # right image ranked 1st
        [0.8, 0.5, 0.1, 0.0],  # 2nd
        [0.7, 0.6, 0.1, 0.2],  # 4th
        [0.1, 0.2, 0.3, 0.4],  # 1st
    ])
    caption_image = torch.arange(4)
    assert text_to_image_ranks(similarity, caption_image).tolist() == [0, 1, 3, 0]
    # Image columns: image 0 -> caption 0 at 0.9 beats all; image 1 -> 0.5 below 0.6 (caption 2);
    # image 2 -> 0.1 ties caption 1 (ties count against it) and is below 0.2 and 0.3; image 3 -> 0.4 top.
    assert image_to_text_ranks(similarity, caption_image).tolist() == [0, 1, 3, 0]
    metrics = retrieval_metrics(similarity, caption_image, ks=(1, 2, 5))
    assert metrics["r1_t2i"] == pytest.approx(0.5)
    assert metrics["r2_t2i"] == pytest.approx(0.75)
    assert metrics["r5_t2i"] == pytest.approx(1.0)
    assert metrics["r1_i2t"] == pytest.approx(0.5)
    assert metrics["r2_i2t"] == pytest.approx(0.75)


def test_retrieval_metrics_several_captions_per_image():
    similarity = torch.tensor([
        [0.2, 0.9],  # caption of image 0, ranked 2nd
        [0.8, 0.1],  # caption of image 0, ranked 1st
        [0.3, 0.7],  # caption of image 1, ranked 1st
    ])
    caption_image = torch.tensor([0, 0, 1])
    assert text_to_image_ranks(similarity, caption_image).tolist() == [1, 0, 0]
    # Image 1's only caption (0.7) is beaten by caption 0 of image 0 (0.9).
    assert image_to_text_ranks(similarity, caption_image).tolist() == [0, 1]


def test_ties_count_against_the_right_item():
    similarity = torch.zeros(3, 3)
    metrics = retrieval_metrics(similarity, torch.arange(3), ks=(1,))
    assert metrics == {"r1_t2i": 0.0, "r1_i2t": 0.0}


def test_matching_accuracy():
    perfect = torch.eye(20) + 0.01 * torch.rand(20, 20)
    assert matching_accuracy(perfect, torch.arange(20), n_candidates=10) == 1.0
    assert matching_accuracy(-perfect, torch.arange(20), n_candidates=10) == 0.0
    # Random scores land near chance (1/4) over many images.
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 2000, generator=generator)
    assert 0.2 < matching_accuracy(noise, torch.arange(2000), n_candidates=4) < 0.3
    with pytest.raises(ValueError, match="n_candidates"):
        matching_accuracy(perfect[:5, :5], torch.arange(5), n_candidates=10)


def test_chance_levels_match_random_scores():
    # Image 0 has three of the four captions, so it always finds one in the top 2; image 1 does half the time.
    caption_image = torch.tensor([0, 0, 0, 1])
    levels = chance_levels(caption_image, n_images=2, n_candidates=2, ks=(1, 2))
    assert levels["r2_i2t"] == pytest.approx(0.75)
    assert levels["r1_i2t"] == pytest.approx(0.5)
    assert levels["r1_t2i"] == pytest.approx(0.5)
    assert levels["match_acc"] == pytest.approx(0.5)
    generator = torch.Generator().manual_seed(0)
    hits = [retrieval_metrics(torch.rand(4, 2, generator=generator), caption_image, ks=(2,))["r2_i2t"]
            for _ in range(400)]
    assert sum(hits) / len(hits) == pytest.approx(0.75, abs=0.05)
    one_each = chance_levels(torch.arange(50), n_images=50, n_candidates=10)
    assert one_each["r10_i2t"] == pytest.approx(10 / 50)
    assert one_each["r5_t2i"] == pytest.approx(5 / 50)


# -- index -----------------------------------------------------------------------------------------------------


def test_index_search_matches_brute_force(tmp_path):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1000, 16, generator=generator)
    labels = [f"item {i}" for i in range(1000)]
    index = RetrievalIndex(embeddings, labels, kind="image")
    queries = torch.randn(3, 16, generator=generator)
    scores, ids = index.search(queries, k=5)
    cosine = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(embeddings, dim=-1).T
    expected = cosine.topk(5, dim=-1)
    assert ids.tolist() == expected.indices.tolist()
    torch.testing.assert_close(scores, expected.values)
    # Self-query returns the item itself.
    assert index.search(embeddings[42], k=1)[1].item() == 42

    index.save(tmp_path / "index.safetensors")
    loaded = RetrievalIndex.load(tmp_path / "index.safetensors")
    assert loaded.labels == labels
    assert loaded.kind == "image"
    torch.testing.assert_close(loaded.embeddings, index.embeddings)


# -- checkpoints -----------------------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_replace(tmp_path):
    model = _small_model()
    tokenizer = DensaTokenizer.train(["red heart", "红心", "blue circle"] * 3, vocab_size=300)
    out = tmp_path / "ckpt"
    save_checkpoint(out, model, tokenizer, {"note": "first"})
    loaded, loaded_tokenizer, config = load_checkpoint(out)
    assert config["note"] == "first"
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert loaded_tokenizer.encode("红心") == tokenizer.encode("红心")

    (out / "index-images.safetensors").write_bytes(b"stale")
    save_checkpoint(out, _small_model(seed=1), tokenizer, {"note": "second"})
    assert load_checkpoint(out)[2]["note"] == "second"
    assert not (out / "index-images.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or backup folders left

    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "keep.txt").write_text("data", encoding="utf-8")
    with pytest.raises(InputError, match="not a densa align checkpoint"):
        save_checkpoint(other, model, tokenizer, {})
    assert (other / "keep.txt").read_text(encoding="utf-8") == "data"
    with pytest.raises(InputError, match="missing"):
        load_checkpoint(other)


# -- data parallel (real gloo processes) -----------------------------------------------------------------------


def _parallel_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        tokens, mask, pixels, ids = _batch(B=4)
        local = slice(2 * rank, 2 * rank + 2)
        results = {}
        for method in ("moco_queue", "in_batch"):
            model = _small_model()
            aligner = ContrastiveAligner(model, ContrastConfig(method=method, queue_size=16, momentum=0.5))
            loss, _ = aligner(tokens[local], mask[local], pixels[local], ids[local])
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            dist.all_reduce(grads)  # what the data-parallel wrapper does, as a sum
            results[method] = {"loss": loss.detach(), "grad_mean": grads / world_size}
            if method == "moco_queue":
                results[method]["queue_ids"] = aligner.image_queue.ordered()[1]
                results[method]["queue_keys"] = aligner.text_queue.ordered()[0]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks leave together, so neither tears gloo down under the other.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_parallel_matches_single_process(tmp_path):
    mp.spawn(_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    tokens, mask, pixels, ids = _batch(B=4)
    for method in ("moco_queue", "in_batch"):
        model = _small_model()
        aligner = ContrastiveAligner(model, ContrastConfig(method=method, queue_size=16, momentum=0.5))
        loss, _ = aligner(tokens, mask, pixels, ids)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        # Each rank's mean over its queries, averaged over ranks, is the full-batch mean.
        mean_loss = (ranks[0][method]["loss"] + ranks[1][method]["loss"]) / 2
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        # Loose enough for a different summation order, far tighter than a missing or doubled gradient.
        torch.testing.assert_close(ranks[0][method]["grad_mean"], grads, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(ranks[1][method]["grad_mean"], grads, rtol=1e-3, atol=1e-5)
        if method == "moco_queue":
            for result in ranks:
                assert result[method]["queue_ids"].tolist() == [0, 1, 2, 3]
                torch.testing.assert_close(result[method]["queue_keys"], aligner.text_queue.ordered()[0])


# -- data ------------------------------------------------------------------------------------------------------

emoji_font = pytest.mark.skipif(
    not any((Path(d) / "NotoColorEmoji.ttf").is_file() for d in data_module.EMOJI_FONT_DIRS),
    reason="fonts-noto-color-emoji is not installed (apt-get install fonts-noto-color-emoji)",
)
coco = pytest.mark.skipif(not (DATA / "images" / "coco_cc_by").is_dir(),
                          reason="../shared/data/images/coco_cc_by is not next to the repo")


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emoji_cache")


@emoji_font
def test_emoji_pairs_bilingual(emoji_cache):
    pairs = data_module.emoji_pairs(32, cache_dir=emoji_cache)
    assert len(pairs) > 1500
    assert pairs.images.shape == (len(pairs), 3, 32, 32)
    assert pairs.images.dtype == torch.uint8
    assert len(pairs.captions) == 2 * len(pairs)
    assert pairs.caption_lang.count("en") == pairs.caption_lang.count("zh") == len(pairs)
    first = pairs.names.index("😀 grinning face")
    rows = (pairs.caption_image == first).nonzero().flatten().tolist()
    assert sorted(pairs.captions[r] for r in rows) == sorted(["grinning face", "嘿嘿"])
    # Images are drawn, not blank: each has non-white pixels.
    assert bool((pairs.images.view(len(pairs), -1).min(dim=1).values < 200).all())


@emoji_font
def test_emoji_pairs_read_from_cache(emoji_cache, monkeypatch):
    first = data_module.emoji_pairs(32, cache_dir=emoji_cache)
    assert list(emoji_cache.glob("emoji-*-32px.safetensors"))

    def fail(*args, **kwargs):
        raise AssertionError("drew emoji although the cache exists")

    monkeypatch.setattr(data_module, "_render_emoji", fail)
    second = data_module.emoji_pairs(32, cache_dir=emoji_cache)
    assert torch.equal(first.images, second.images)
    assert first.captions == second.captions


def test_emoji_font_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data_module, "EMOJI_FONT_DIRS", (str(tmp_path),))
    with pytest.raises(InputError, match="apt-get install fonts-noto-color-emoji"):
        data_module.emoji_pairs(32, cache_dir=tmp_path)
    with pytest.raises(InputError, match="emoji font not found"):
        data_module.find_emoji_font(tmp_path / "missing.ttf")


@emoji_font
def test_split_is_by_image(emoji_cache):
    pairs = data_module.emoji_pairs(32, cache_dir=emoji_cache)
    train_items, eval_items = data_module.split_items(len(pairs), 0.2, seed=0)
    train, held_out = pairs.subset(train_items), pairs.subset(eval_items)
    assert len(held_out) == round(0.2 * len(pairs))
    assert len(train) + len(held_out) == len(pairs)
    assert not set(train.names) & set(held_out.names)
    assert len(held_out.captions) == 2 * len(held_out)
    assert int(held_out.caption_image.max()) == len(held_out) - 1
    # Every held-out caption still points at its own image after renumbering.
    for row in range(0, len(held_out.captions), 97):
        original = pairs.names.index(held_out.names[held_out.caption_image[row]])
        own_captions = [pairs.captions[c] for c in (pairs.caption_image == original).nonzero().flatten()]
        assert held_out.captions[row] in own_captions
    again = data_module.split_items(len(pairs), 0.2, seed=0)
    assert torch.equal(again[1], eval_items)


@coco
def test_folder_pairs_coco_layout():
    pairs = data_module.folder_pairs(DATA / "images" / "coco_cc_by", 32)
    assert len(pairs) == 37
    assert len(pairs.captions) >= 5 * 37
    assert set(pairs.caption_lang) == {"en"}
    assert pairs.images.shape == (37, 3, 32, 32)


def test_folder_pairs_bad_input(tmp_path):
    with pytest.raises(InputError, match="captions file not found"):
        data_module.folder_pairs(tmp_path, 32)
    (tmp_path / "captions.jsonl").write_text('{"file_name": "a.png", "captions": ["一只猫"]}\n', encoding="utf-8")
    with pytest.raises(InputError, match="image not found"):
        data_module.folder_pairs(tmp_path, 32)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    pairs = data_module.folder_pairs(tmp_path, 16)
    assert pairs.caption_lang == ["zh"]
    assert pairs.images[0, :, 8, 8].tolist() == [255, 0, 0]  # centre of the padded square is the red image
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="file_name and captions"):
        data_module.folder_pairs(tmp_path, 32)


def test_sampler_batches_distinct_images():
    pairs = data_module.PairDataset(
        images=torch.zeros(6, 3, 8, 8, dtype=torch.uint8), names=[str(i) for i in range(6)],
        captions=[f"c{i}" for i in range(6)] + ["中文"], caption_image=torch.tensor([0, 1, 2, 3, 4, 5, 0]),
        caption_lang=["en"] * 6 + ["zh"],
    )
    tokenizer = DensaTokenizer.train(pairs.captions * 3, vocab_size=300)
    tokens = data_module.CaptionTokens(pairs.captions, tokenizer, max_len=8)
    sampler = data_module.PairSampler(pairs, tokens, batch_size=3, langs=("en",), seed=0)
    seen = []
    for _ in range(2):  # one epoch of 6 images
        ids, mask, pixels, items = sampler.next_batch()
        assert ids.shape == mask.shape
        assert ids.shape[0] == 3
        assert pixels.shape == (3, 3, 8, 8)
        seen += items.tolist()
    assert sorted(seen) == list(range(6))
    zh_only = data_module.PairSampler(pairs, tokens, batch_size=1, langs=("zh",), seed=0)
    assert zh_only.next_batch()[3].tolist() == [0]
    with pytest.raises(InputError, match="batch size"):
        data_module.PairSampler(pairs, tokens, batch_size=2, langs=("zh",))


def test_lr_schedule_warmup_then_step_decay():
    config = TrainConfig(lr=1e-4, warmup_steps=10, decay_every=100, decay_factor=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(99, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(0.1)
    assert lr_factor(250, config) == pytest.approx(0.01)
    assert TrainConfig().decay_every == 100_000


# -- end to end (CLI) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, emoji_cache):
    if not any((Path(d) / "NotoColorEmoji.ttf").is_file() for d in data_module.EMOJI_FONT_DIRS):
        pytest.skip("fonts-noto-color-emoji is not installed (apt-get install fonts-noto-color-emoji)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("align") / "ckpt"
    try:
        rc = cli_main(["align", "train", "--data", "emoji", "--cache-dir", str(emoji_cache), "--out", str(out),
                       "--steps", "300", "--batch-size", "64", "--lr", "5e-4", "--warmup-steps", "30",
                       "--queue-size", "2048", "--momentum", "0.99"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


@pytest.mark.slow
def test_train_beats_chance_on_held_out_emoji(trained):
    config = json.loads((trained / "config.json").read_text(encoding="utf-8"))
    assert config["contrast"]["method"] == "moco_queue"
    assert config["weights"] == "ema"
    for lang in ("en", "zh"):
        metrics = config["eval"][lang]
        n_images = metrics["n_images"]
        assert n_images > 300
        # Chance: Recall@10 = 10 / n_images (about 2.6%), matching accuracy = 1/10.
        assert metrics["r10_t2i"] > 4 * 10 / n_images, metrics
        assert metrics["r10_i2t"] > 4 * 10 / n_images, metrics
        assert metrics["match_acc"] > 0.2, metrics


@pytest.mark.slow
def test_eval_reproduces_training_metrics(trained, emoji_cache, tmp_path):
    out = tmp_path / "metrics.json"
    rc = cli_main(["align", "eval", "--checkpoint", str(trained), "--cache-dir", str(emoji_cache),
                   "--json", str(out)])
    assert rc == 0
    stored = json.loads((trained / "config.json").read_text(encoding="utf-8"))["eval"]
    measured = json.loads(out.read_text(encoding="utf-8"))
    for lang in ("en", "zh"):
        for key in ("r1_t2i", "r5_i2t", "r10_t2i", "match_acc"):
            assert measured[lang][key] == pytest.approx(stored[lang][key], abs=1e-6), (lang, key)


@pytest.mark.slow
def test_search_text_and_image(trained, emoji_cache, tmp_path, capsys):
    rc = cli_main(["align", "search", "--checkpoint", str(trained), "--cache-dir", str(emoji_cache),
                   "-k", "3", "red heart"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert (trained / "index-images.safetensors").is_file()

    pairs = data_module.emoji_pairs(32, cache_dir=emoji_cache)
    Image.fromarray(pairs.images[0].permute(1, 2, 0).numpy()).save(tmp_path / "query.png")
    rc = cli_main(["align", "search", "--checkpoint", str(trained), "--cache-dir", str(emoji_cache),
                   "--image", str(tmp_path / "query.png"), "-k", "4"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    index = RetrievalIndex.load(trained / "index-captions.safetensors")
    assert len(index) == len(pairs.captions)


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    assert cli_main(["align", "eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_missing_image_exits_2(trained, tmp_path, capsys):
    rc = cli_main(["align", "search", "--checkpoint", str(trained), "--image", str(tmp_path / "none.png")])
    assert rc == 2
    assert "image not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert cli_main(["align", "search", "--checkpoint", str(trained), "--image", str(tmp_path / "bad.png")]) == 2
    assert cli_main(["align", "search", "--checkpoint", str(trained), "--image", "x.png", "text"]) == 2
    assert cli_main(["align", "search", "--checkpoint", str(trained), "   "]) == 2


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--momentum", "1.5"], ["--langs", "fr"], ["--temperature", "2"], ["--data", "/no/such/dir"],
     ["--emoji-font", "/no/such/font.ttf"], ["--method", "simclr"]],
)
def test_cli_train_bad_value_exits_2(argv, tmp_path):
    try:
        rc = cli_main(["align", "train", "--out", str(tmp_path / "out"), "--steps", "1", *argv])
    except SystemExit as exit:  # argparse rejects some values itself
        rc = exit.code
    assert rc == 2
    assert not (tmp_path / "out").exists()
