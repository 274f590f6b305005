"""densa.hf on tiny randomly initialised Llama and Qwen2 models, against eager attention under explicit masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

pytest.importorskip("transformers", reason="densa.hf needs the optional transformers package (densa[hf])")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from densa import hf  # noqa: E402
from densa.attention.reference import dense_mask  # noqa: E402
from densa.data.readers import read_vcsum  # noqa: E402
from densa.density.plan import PlanConfig, generated_window  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PLAN = PlanConfig(threshold=0.5, block_size=16, near_window=(8, 24), far_window=(4, 8), near_tokens=32,
                  far_tokens=64, max_dense_fraction=0.2)
VOCAB = 400
PROMPT_TOKENS = 160


@pytest.fixture(scope="module")
def meeting() -> str:
    return read_vcsum(DATA / "longdoc" / "vcsum" / "short_dev.txt")[0].text[:3000]


@pytest.fixture(scope="module")
def tokenizer(meeting) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the meeting, wrapped as a transformers fast tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([meeting], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def prompt(meeting, tokenizer) -> str:
    """The longest prefix of the meeting that encodes to exactly PROMPT_TOKENS tokens."""
    offsets = tokenizer(meeting, return_offsets_mapping=True)["offset_mapping"]
    text = meeting[: offsets[PROMPT_TOKENS - 1][1]]
    assert len(tokenizer(text).input_ids) == PROMPT_TOKENS
    return text


def tiny_model(family: str):
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()


def additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask [T_q, T_k] -> float mask [1, 1, T_q, T_k] for eager attention."""
    return torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))[None, None]


def eager_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(ids, attention_mask=additive(mask)).logits


def decode_rule_mask(plans: hf.DensityPlans, total: int) -> torch.Tensor:
    """Bool [total, total]: prompt rows from the plan, generated rows from the decode rule."""
    plan = plans.plans[0]
    T = plan.seq_len
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:T, :T] = dense_mask(plan)
    keys = torch.arange(total)
    dense = torch.zeros(total, dtype=torch.bool)
    dense[:T] = plan.token_dense()
    for position in range(T, total):
        window = generated_window(plan, position, plans.config)
        mask[position] = (keys <= position) & (dense | (position - keys < window))
    return mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefill_equals_eager_under_plan_mask(family, tokenizer, prompt):
    model = tiny_model(family)
    plans = hf.density_plans(tokenizer, prompt, PLAN)
    assert plans.plans[0].dense.any(), "the plan of this prompt should have a dense block"
    assert not plans.plans[0].dense.all()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    reference = eager_logits(model, ids, dense_mask(plans.plans[0]))

    hf.enable(model)
    with torch.no_grad(), hf.use_plans(plans):
        through_context = model(ids).logits
    with torch.no_grad():
        through_kwarg = model(ids, densa=plans).logits
    torch.testing.assert_close(through_context, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(through_kwarg, reference, atol=1e-5, rtol=1e-4)
    # The plan changes the result: dense causal attention gives other logits.
    causal = eager_logits(model, ids, torch.ones(len(ids[0]), len(ids[0]), dtype=torch.bool).tril())
    assert (causal - reference).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_matches_eager_and_density_cache(family, tokenizer, prompt):
    model = tiny_model(family)
    plans = hf.density_plans(tokenizer, prompt, PLAN, backend="blocksparse")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = 40
    hf.enable(model)
    full = hf.generate_greedy(model, ids, plans, new)
    kept = hf.generate_greedy(model, ids, plans, new, cache="density", prefill_chunk=48)
    assert full.shape == (1, PROMPT_TOKENS + new)
    assert torch.equal(kept, full)

    # Teacher-forced eager forward over prompt + generated text under the same
    # rule: its argmax at each step must be the token generation picked.
    reference = eager_logits(model, full[:, :-1], decode_rule_mask(plans, PROMPT_TOKENS + new - 1))
    assert torch.equal(reference[:, PROMPT_TOKENS - 1 :].argmax(-1), full[:, PROMPT_TOKENS:])


def test_model_generate_inside_use_plans(tokenizer, prompt):
    model = tiny_model("llama")
    plans = hf.density_plans(tokenizer, prompt, PLAN)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    hf.enable(model)
    with hf.use_plans(plans):
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, hf.generate_greedy(model, ids, plans, 12))


def test_offsets_give_same_plans_as_tokenizer(tokenizer, prompt):
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    from_tokenizer = hf.density_plans(tokenizer, prompt, PLAN).plans[0]
    from_offsets = hf.density_plans(offsets, prompt, PLAN).plans[0]
    assert torch.equal(from_offsets.dense, from_tokenizer.dense)
    assert torch.equal(from_offsets.window, from_tokenizer.window)
    batch = hf.density_plans([offsets, offsets], [prompt, prompt], PLAN)
    assert len(batch.plans) == 2


def test_bad_inputs_rejected(tokenizer, prompt):
    with pytest.raises(ValueError, match="threshold=0 is invalid"):
        hf.density_plans(tokenizer, prompt, PlanConfig(threshold=0))
    with pytest.raises(ValueError, match="far_window=\\(8, 4\\) is invalid"):
        PlanConfig(far_window=(8, 4))
    with pytest.raises(ValueError, match="backend='fast' is invalid"):
        hf.density_plans(tokenizer, prompt, PLAN, backend="fast")
    with pytest.raises(ValueError, match="one list per text"):
        hf.density_plans([[(0, 1)], [(0, 1)]], [prompt], PLAN)

    model = tiny_model("llama")
    hf.enable(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="has no plans"):
        model(ids)
    plans = hf.density_plans(tokenizer, prompt, PLAN)
    with pytest.raises(ValueError, match="cache='paged' is invalid"):
        hf.generate_greedy(model, ids, plans, 4, cache="paged")
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    with pytest.raises(ValueError, match="does not support padding masks"):
        model(ids, attention_mask=padding, densa=plans)
