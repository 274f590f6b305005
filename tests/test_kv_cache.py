"""The density-aware key/value cache and chunked prefill against the full cache and unchunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densa.attention.chunked import chunk_bounds
from densa.attention.kv_cache import SlotLayout, allocate_density_caches, cache_bytes
from densa.attention.reference import reference_attention
from densa.density.plan import PlanConfig, plan_blocks
from densa.model.config import ModelConfig
from densa.model.generate import decode_step, decode_windows, generate, prefill
from densa.model.llama import AttentionContext, Transformer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PLAN = PlanConfig(block_size=16, near_window=(8, 16), far_window=(4, 8), near_tokens=16, far_tokens=48,
                  max_dense_fraction=0.25)
T = 150


def small_model(attention: str = "density", vocab_size: int = 97, **changes) -> Transformer:
    torch.manual_seed(0)
    values = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=256, window=12, plan=PLAN, backend="reference", attention=attention)
    return Transformer(ModelConfig(**{**values, **changes})).eval()


def prompt_and_density(B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts whose plans differ: one dense block early, three dense blocks mid-way."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 97, (B, T), generator=generator)
    density = torch.rand(B, T, generator=generator) * 0.6
    density[0, 16:32] = 0.9
    if B > 1:
        density[1, 48:80] = 0.95
        density[1, 96:112] = 0.9
    return prompt, density


def chunked_logits(model, prompt, context, chunk) -> tuple[torch.Tensor, list]:
    """Logits [B, T, V] of the prompt fed in chunks through a density-aware cache."""
    config = model.config
    caches = allocate_density_caches(context.plans, decode_windows(context, model, prompt.shape[1]),
                                     config.n_layers, config.n_kv_heads, config.head_dim)
    outs = [model(prompt[:, s:e], context=context, caches=caches, start_pos=s)
            for s, e in chunk_bounds(prompt.shape[1], chunk)]
    return torch.cat(outs, dim=1), caches


@pytest.mark.parametrize("chunk", [7, 16, 40, T])
def test_chunked_prefill_equals_unchunked(chunk):
    model = small_model()
    prompt, density = prompt_and_density()
    context = model.attention_context(2, T, density)
    with torch.no_grad():
        whole = model(prompt, context=context)
        chunked, caches = chunked_logits(model, prompt, context, chunk)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
    # The staged prompt prefix is freed once the last dense block is processed.
    assert all(cache.stage_k is None for cache in caches)


def test_chunked_attention_many_blocks_matches_reference():
    """132 blocks, dense ones late in the prompt: chunk-level attention against the reference backend."""
    length = 2100
    generator = torch.Generator().manual_seed(2)
    density = torch.rand(length, generator=generator) * 0.6
    for start in (300, 1200, 1900, 2080):
        density[start : start + 16] = 0.95
    plan = plan_blocks(density, PLAN)
    assert plan.n_blocks >= 128
    assert int(plan.dense.nonzero().max()) * PLAN.block_size >= 1900
    q = torch.randn(1, 4, length, 8, generator=generator)
    k = torch.randn(1, 2, length, 8, generator=generator)
    v = torch.randn(1, 2, length, 8, generator=generator)
    expected = reference_attention(q, k, v, plan)
    context = AttentionContext("density", True, [plan], "reference")
    for chunk in (256, 700):
        cache = allocate_density_caches([plan], [16], 1, 2, 8)[0]
        outs = [cache.attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], context) for s, e in chunk_bounds(length, chunk)]
        torch.testing.assert_close(torch.cat(outs, dim=2), expected, atol=1e-5, rtol=1e-4)


def test_chunked_prefill_sliding_attention():
    model = small_model("sliding")
    prompt, _ = prompt_and_density()
    context = model.attention_context(2, T, None)
    with torch.no_grad():
        whole = model(prompt, context=context)
        chunked, _ = chunked_logits(model, prompt, context, 32)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [None, 32])
def test_density_cache_logits_match_full_cache(chunk):
    model = small_model()
    prompt, density = prompt_and_density()
    full_logits, full = prefill(model, prompt, density, "full", max_len=T + 60)
    kept_logits, kept = prefill(model, prompt, density, "density", prefill_chunk=chunk)
    torch.testing.assert_close(kept_logits, full_logits, atol=1e-5, rtol=1e-4)

    # Feed the full cache's greedy tokens to both, so every step compares the same inputs.
    token = full_logits.argmax(-1, keepdim=True)
    for _ in range(60):
        full_logits = decode_step(model, full, token)
        kept_logits = decode_step(model, kept, token)
        torch.testing.assert_close(kept_logits, full_logits, atol=1e-5, rtol=1e-4)
        assert torch.equal(kept_logits.argmax(-1), full_logits.argmax(-1))
        token = full_logits.argmax(-1, keepdim=True)


@pytest.mark.parametrize("attention", ["density", "sliding"])
def test_greedy_tokens_match_full_cache(attention):
    model = small_model(attention)
    prompt, density = prompt_and_density()
    density = density if attention == "density" else None
    full = generate(model, prompt, 50, density, temperature=0)
    kept = generate(model, prompt, 50, density, temperature=0, cache="density", prefill_chunk=20)
    assert kept.shape == (2, T + 50)
    assert torch.equal(kept, full)


def test_cache_memory_bounded():
    model = small_model()
    prompt, density = prompt_and_density()
    _, state = prefill(model, prompt, density, "density", prefill_chunk=32)
    cache = state.caches[0]
    window = max(decode_windows(state.context, model, T))
    dense_tokens = [int(plan.token_dense().sum()) for plan in state.context.plans]
    assert cache.k.shape[2] <= max(dense_tokens) + max(window, PLAN.near_window[1])
    bytes_after_prefill = cache_bytes(state.caches)

    token = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(80):
        decode_step(model, state, token)
    assert cache_bytes(state.caches) == bytes_after_prefill
    assert state.caches[1].k.shape == cache.k.shape
    position = state.position
    for row, plan in enumerate(state.context.plans):
        dense = plan.token_dense().nonzero().flatten()
        kept = cache.kept_positions(row)
        # High-density prompt tokens stay; of the rest only the latest ring's worth.
        assert set(dense.tolist()) <= set(kept.tolist())
        rest = kept[~torch.isin(kept, dense)]
        assert rest.numel() <= cache.layout.ring
        assert int(rest.min()) >= position - cache.layout.ring
        assert len(kept) <= dense.numel() + cache.layout.ring


def test_cache_is_smaller_than_full_cache():
    model = small_model(max_seq_len=1024)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 97, (1, 800), generator=generator)
    density = torch.rand(1, 800, generator=generator) * 0.5
    density[0, 320:352] = 0.9
    _, full = prefill(model, prompt, density, "full", max_len=900)
    _, kept = prefill(model, prompt, density, "density", prefill_chunk=128)
    # 32 dense tokens + a 16-token ring, against 900 cached positions.
    assert kept.caches[0].k.shape[2] == 48
    assert cache_bytes(kept.caches) < cache_bytes(full.caches) / 10


def test_decode_mask_reading_evicted_keys_rejected():
    model = small_model()
    prompt, density = prompt_and_density()
    _, state = prefill(model, prompt, density, "density")
    every_key = torch.ones(2, T + 1, dtype=torch.bool)
    step = AttentionContext("density", True, state.context.plans, "reference", every_key)
    with pytest.raises(ValueError, match="reads keys this cache evicted"):
        model(torch.zeros(2, 1, dtype=torch.long), context=step, caches=state.caches, start_pos=T)


def test_real_document_plan():
    """A real meeting transcript: its own tokenizer, analyser densities and plan."""
    from densa.data.readers import read_vcsum
    from densa.data.tokenizer import DensaTokenizer
    from densa.density import DensityAnalyzer

    meeting = read_vcsum(DATA / "longdoc" / "vcsum" / "short_dev.txt")[0].text[:600]
    tokenizer = DensaTokenizer.train([meeting], 320)
    ids, offsets = tokenizer.encode(meeting)
    ids = ids[:200]
    density = DensityAnalyzer().analyze(meeting, offsets).density[None, :200]
    plan = PlanConfig(threshold=0.5, block_size=16, max_dense_fraction=0.2, near_window=(8, 24),
                      far_window=(4, 8), near_tokens=32, far_tokens=64)
    model = small_model(vocab_size=tokenizer.vocab_size, plan=plan)
    prompt = torch.tensor([ids])
    context = model.attention_context(1, 200, density)
    assert context.plans[0].dense.any(), "the plan of this meeting should have a dense block"
    with torch.no_grad():
        whole = model(prompt, context=context)
        chunked, _ = chunked_logits(model, prompt, context, 48)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
    full = generate(model, prompt, 40, density, temperature=0)
    kept = generate(model, prompt, 40, density, temperature=0, cache="density", prefill_chunk=64)
    assert torch.equal(kept, full)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(cache="paged"), "cache='paged' is invalid"),
        (dict(cache="density", prefill_chunk=0), "prefill chunk=0 is invalid"),
        (dict(cache="full", prefill_chunk=16), "prefill_chunk needs cache='density'"),
    ],
)
def test_bad_generation_arguments_rejected(kwargs, fragment):
    model = small_model()
    prompt, density = prompt_and_density()
    with pytest.raises(ValueError, match=fragment):
        prefill(model, prompt, density, **kwargs)


def test_dense_attention_rejects_density_cache():
    model = small_model("dense")
    prompt, _ = prompt_and_density()
    with pytest.raises(ValueError, match="dense attention reads every key"):
        generate(model, prompt, 3, cache="density")


def test_bad_window_and_threshold_rejected():
    model = small_model()
    _, density = prompt_and_density()
    plans = model.attention_context(2, T, density).plans
    with pytest.raises(ValueError, match="decode window=0 is invalid"):
        SlotLayout.build(plans, [16, 0])
    with pytest.raises(ValueError, match="near_window=\\(0, 8\\) is invalid"):
        PlanConfig(near_window=(0, 8))
    with pytest.raises(ValueError, match="threshold=1.5 is invalid"):
        PlanConfig(threshold=1.5)
