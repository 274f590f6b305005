"""The decoder: config checks, attention patterns against the reference, cached decoding."""

from __future__ import annotations

import pytest
import torch

from densa.attention.reference import reference_attention
from densa.density.plan import PlanConfig
from densa.model.config import ModelConfig, preset, tiny
from densa.model.generate import generate
from densa.model.llama import Transformer

PLAN = PlanConfig(block_size=16, near_window=(8, 16), far_window=(4, 8), near_tokens=16, far_tokens=48,
                  max_dense_fraction=0.25)


def small_config(**changes) -> ModelConfig:
    values = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128,
                  window=12, plan=PLAN)
    return ModelConfig(**{**values, **changes})


def density_for(B: int, T: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    density = torch.rand(B, T, generator=generator) * 0.6
    density[:, 16:32] = 0.9
    return density


def test_presets_build_and_validate():
    assert tiny().attention == "density"
    assert preset("small").max_seq_len == 16384
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"dim": 30}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "not a multiple of n_kv_heads"),
        ({"attention": "linear"}, "attention='linear' is invalid"),
        ({"window": 0}, "window=0 is invalid"),
        ({"dim": 36, "n_heads": 4}, "odd"),
    ],
)
def test_invalid_config_rejected(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        small_config(**changes)


def test_config_round_trips_through_dict():
    config = small_config(attention="sliding")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**config.to_dict(), "heads": 3})


@pytest.mark.parametrize("attention", ["sliding", "density"])
def test_sparse_model_matches_reference_backend(attention):
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (2, 70))
    density = density_for(2, 70)
    fast = Transformer(small_config(attention=attention, backend="blocksparse"))
    slow = Transformer(small_config(attention=attention, backend="reference"))
    slow.load_state_dict(fast.state_dict())

    fast_logits = fast(tokens, density=density)
    slow_logits = slow(tokens, density=density)
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-5, rtol=1e-4)

    fast_logits.square().mean().backward()
    slow_logits.square().mean().backward()
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dense_model_equals_full_plan():
    # A plan where every block is dense is causal attention: same logits as SDPA.
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (1, 40))
    dense = Transformer(small_config(attention="dense"))
    everything = Transformer(small_config(attention="density", backend="reference",
                                          plan=PlanConfig(block_size=16, threshold=0.1, max_dense_fraction=1.0)))
    everything.load_state_dict(dense.state_dict())
    torch.testing.assert_close(dense(tokens), everything(tokens, density=torch.ones(1, 40)), atol=1e-5, rtol=1e-4)


def test_sliding_differs_from_dense():
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (1, 60))
    dense = Transformer(small_config(attention="dense"))
    sliding = Transformer(small_config(attention="sliding"))
    sliding.load_state_dict(dense.state_dict())
    # Inside the window the two agree; past it they must not.
    torch.testing.assert_close(dense(tokens)[:, :12], sliding(tokens)[:, :12], atol=1e-5, rtol=1e-4)
    assert (dense(tokens)[:, 40:] - sliding(tokens)[:, 40:]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["dense", "sliding"])
def test_cached_decoding_matches_full_forward(attention):
    torch.manual_seed(0)
    model = Transformer(small_config(attention=attention, backend="reference"))
    prompt = torch.randint(0, 97, (2, 20))
    out = generate(model, prompt, 25, temperature=0)
    assert out.shape == (2, 45)
    assert torch.equal(out[:, :20], prompt)
    # Greedy tokens from the cache equal the argmax of one forward over the whole text.
    full = model(out[:, :-1]).argmax(-1)
    assert torch.equal(full[:, 19:], out[:, 20:])


def test_density_decoding_uses_prompt_dense_keys():
    torch.manual_seed(0)
    model = Transformer(small_config(attention="density", backend="reference"))
    prompt = torch.randint(0, 97, (1, 40))
    density = density_for(1, 40)
    out = generate(model, prompt, 10, density=density, temperature=0)
    assert out.shape == (1, 50)

    # Recompute the last generated step by hand: prompt under its plan, then
    # each generated query reads its window plus the prompt's dense keys.
    from densa.model.generate import decode_mask

    context = model.attention_context(1, 40, density)
    row = decode_mask(context, model, 45)[0]
    dense_tokens = context.plans[0].token_dense()
    assert row[:40][dense_tokens].all()
    assert not row[:40][~dense_tokens][:10].any()


def test_generate_rejects_bad_arguments():
    model = Transformer(small_config(attention="dense"))
    prompt = torch.randint(0, 97, (1, 5))
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="temperature=-0.5"):
        generate(model, prompt, 3, temperature=-0.5)
    with pytest.raises(ValueError, match="density attention needs token densities"):
        Transformer(small_config())(prompt)
    with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
