"""Pass-key retrieval by trained models: density-adaptive against sliding-window attention.

Small models are trained on CPU to answer a pass-key question at the end of a
real document: VCSum, GovReport or the bank's annual report. They are then
asked for pass keys placed at many depths of held-out documents of 8K and 16K
tokens.

Task. A sentence "The pass key is 5 8 2 1. Remember it. 5 8 2 1 is the pass
key." (Chinese for the Chinese sources) goes after a sentence end at a random
depth, and "What is the pass key? The pass key is" ends the text, followed by
the answer. Each key digit is one token, so a sample's token positions do not
depend on its key; training draws a fresh key for every use of a sample,
which rules out memorising keys. Densities come from DensityAnalyzer on the
sample's text, as in training and serving.

Models. The same architecture, data, seed and steps, with attention:
  density  the block plan of PLAN (64-token blocks, windows 64-128 near dense
           blocks and 16-32 far from them, up to 5% of blocks dense);
  sliding  a fixed window whose block sparsity matches the density plans' mean
           on the training samples; at each evaluation length the window is
           matched again to the density plans of that length's samples;
  dense    (--dense) full causal attention, the upper bound.
Loss: cross-entropy on the answer digits plus 0.1 times the language-model
loss at 128 random other positions per step. rope_theta is 1e5 for every model, which keeps
the low RoPE frequencies nearly constant across the 8x longer evaluation texts.

Accuracy is exact match of all key digits under greedy decoding (equivalently,
the argmax at every answer position given the correct earlier digits); digit
accuracy is also reported. Chance is 10^-4 and 10%.

    python benchmarks/passkey.py --json passkey.json

Legend: S samples, T tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import densa  # noqa: F401  (before torch: sets OMP_WAIT_POLICY)
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODEL_SIZES, load_sources, matched_window  # noqa: E402

from densa.data.corpus import train_val_split  # noqa: E402
from densa.data.tokenizer import DensaTokenizer  # noqa: E402
from densa.density import DensityAnalyzer  # noqa: E402
from densa.density.plan import BlockPlan, PlanConfig, plan_blocks  # noqa: E402
from densa.io import atomic_write_text  # noqa: E402
from densa.model.config import tiny  # noqa: E402
from densa.model.llama import Transformer  # noqa: E402

PLAN = PlanConfig(threshold=0.7, block_size=64, near_window=(64, 128), far_window=(16, 32),
                  near_tokens=128, far_tokens=512, max_dense_fraction=0.05)
TEMPLATES = {
    "en": (" The pass key is ", ". Remember it. ", " is the pass key. ", "\nWhat is the pass key? The pass key is "),
    "zh": ("通行密码是", "。记住它。", "就是通行密码。", "\n通行密码是什么？通行密码是"),
}
DIGITS = 4
# Small enough to train each model in about 20 minutes on one core.
MODEL = MODEL_SIZES["mini"]

log = logging.getLogger("benchmarks.passkey")


@dataclass
class Sample:
    """One text with a pass-key slot: tokens [T] with placeholder digits, densities [T], digit positions."""

    tokens: torch.Tensor
    density: torch.Tensor
    key_slots: list[int]  # positions of both key copies' digits, 2 x DIGITS
    answer_slots: list[int]  # positions of the answer digits, the sequence's last DIGITS tokens
    depth: float
    source: str

    def with_key(self, key: list[int]) -> torch.Tensor:
        tokens = self.tokens.clone()
        tokens[self.key_slots] = torch.tensor(key * 2)
        tokens[self.answer_slots] = torch.tensor(key)
        return tokens


def digit_ids(tokenizer: DensaTokenizer) -> list[int]:
    ids = [tokenizer.token_to_id(str(d)) for d in range(10)]
    if None in ids:
        raise RuntimeError("the tokenizer lacks single-digit tokens; train it on text that contains digits")
    return ids


def build_sample(text: str, language: str, source: str, depth: float, length: int,
                 tokenizer: DensaTokenizer, analyzer: DensityAnalyzer, digits: list[int]) -> Sample | None:
    """Cut `text` so that the sample has exactly `length` tokens; None when the text is too short."""
    before, middle, after, question = TEMPLATES[language]
    fixed = sum(len(tokenizer.encode(part)[0]) for part in TEMPLATES[language]) + 3 * DIGITS
    ids, offsets = tokenizer.encode(text)
    # A little more body than fits: the surplus is trimmed after the pass key,
    # because segment-wise encoding merges a few tokens differently.
    if len(ids) < length + 32:
        return None
    body = text[: offsets[length - fixed + 32][0]]
    cut = int(len(body) * depth)
    ends = [e + 1 for e in (body.find(mark, cut) for mark in ("\n", "。", ". ")) if e >= 0]
    cut = min(ends) if ends else cut
    key_text = "0" * DIGITS
    # Segment 6 is the body after the pass key, trimmed below to fit `length`.
    segments = [body[:cut], before, key_text, middle, key_text, after, body[cut:], question, key_text]

    # Encode segment by segment so that each key digit is its own token.
    tokens, slots, char_offsets, position, tail_tokens = [], [], [], 0, 0
    for i, segment in enumerate(segments):
        if segment is key_text:
            slots.append(list(range(len(tokens), len(tokens) + DIGITS)))
            tokens += [digits[0]] * DIGITS
            char_offsets += [(position + j, position + j + 1) for j in range(DIGITS)]
        else:
            seg_ids, seg_offsets = tokenizer.encode(segment)
            if i == 6:
                tail_tokens = len(seg_ids)
            tokens += seg_ids
            char_offsets += [(position + a, position + b) for a, b in seg_offsets]
        position += len(segment)
    # Trim body text from the end so that the sample has exactly `length` tokens.
    extra = len(tokens) - length
    if not 0 <= extra <= tail_tokens:
        return None
    tail_start = slots[1][-1] + 1 + len(tokenizer.encode(after)[0])
    del tokens[tail_start : tail_start + extra]
    del char_offsets[tail_start : tail_start + extra]
    answer = list(range(length - DIGITS, length))
    full_text = "".join(segments)
    density = analyzer.analyze(full_text, char_offsets).density
    return Sample(torch.tensor(tokens), torch.as_tensor(density, dtype=torch.float32),
                  slots[0] + slots[1], answer, depth, source)


def long_texts(docs_by_source: dict[str, list], min_chars: int, per_source: int, rng: random.Random):
    """Yield (source, text): runs of consecutive documents joined until at least `min_chars` characters."""
    for source, docs in docs_by_source.items():
        for _ in range(per_source):
            i = rng.randrange(len(docs))
            parts, size = [], 0
            for j in range(len(docs)):
                parts.append(docs[(i + j) % len(docs)].text)
                size += len(parts[-1])
                if size >= min_chars:
                    break
            yield source, "\n\n".join(parts)


def make_samples(docs_by_source, length: int, count_per_source: int, depths, tokenizer, analyzer,
                 digits, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    # Chinese text runs about 1.3 characters per token here and English about 4; 6 covers both.
    for source, text in long_texts(docs_by_source, 6 * length, count_per_source, rng):
        language = "en" if source == "govreport" else "zh"
        for depth in depths(rng):
            sample = build_sample(text, language, source, depth, length, tokenizer, analyzer, digits)
            if sample is not None:
                samples.append(sample)
    return samples


def hidden_states(model: Transformer, tokens: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """Final normalised hidden states [B, T, C]: the forward pass without the vocabulary projection."""
    B, T = tokens.shape
    context = model.attention_context(B, T, density)
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h, model.freqs[:T], context, None)
    return model.norm(h)


def losses(model: Transformer, tokens: torch.Tensor, density: torch.Tensor, answer: list[int],
           lm_positions: torch.Tensor):
    """(answer loss, language-model loss at `lm_positions`) for tokens [B, T].

    Only the answer positions and a random subset of the others go through
    the vocabulary projection, which would otherwise cost as much as the rest
    of this small model.
    """
    h = hidden_states(model, tokens[:, :-1], density[:, :-1])  # [B, T-1, C]
    answer_at = torch.tensor([a - 1 for a in answer])
    answer_logits = model.output(h[:, answer_at])  # [B, DIGITS, V]
    answer_loss = F.cross_entropy(answer_logits.flatten(0, 1).float(), tokens[:, answer_at + 1].flatten())
    lm_logits = model.output(h[:, lm_positions])
    lm_loss = F.cross_entropy(lm_logits.flatten(0, 1).float(), tokens[:, lm_positions + 1].flatten())
    return answer_loss, lm_loss


def train(attention: str, window: int, samples: list[Sample], tokenizer, digits, args) -> tuple[Transformer, float]:
    torch.manual_seed(args.seed)
    config = tiny(tokenizer.vocab_size, attention=attention, window=window, plan=PLAN,
                  max_seq_len=max(args.eval_lengths), rope_theta=1e5, **MODEL)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(args.steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.1, 1 - (s - warmup) / max(args.steps - warmup, 1))))
    rng = random.Random(args.seed)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = [samples[rng.randrange(len(samples))] for _ in range(args.batch_size)]
        tokens = torch.stack([s.with_key([digits[rng.randrange(10)] for _ in range(DIGITS)]) for s in batch])
        density = torch.stack([s.density for s in batch])
        lm_positions = torch.randperm(args.train_length - DIGITS - 1)[: args.lm_positions]
        answer_loss, lm_loss = losses(model, tokens, density, batch[0].answer_slots, lm_positions)
        loss = answer_loss + 0.1 * lm_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % args.log_every == 0:
            log.info("%s step %d/%d answer loss %.3f lm loss %.3f (%.1f s)", attention, step + 1, args.steps,
                     answer_loss.item(), lm_loss.item(), time.perf_counter() - start)
    model.eval()
    return model, time.perf_counter() - start


@torch.no_grad()
def answer_accuracy(model: Transformer, samples: list[Sample], digits: list[int], seed: int) -> list[dict]:
    """Per sample: whether every digit is the argmax given the earlier ones, and the digits right."""
    rng = random.Random(seed)
    results = []
    for sample in samples:
        key = [digits[rng.randrange(10)] for _ in range(DIGITS)]
        tokens = sample.with_key(key)[None]
        h = hidden_states(model, tokens[:, :-1], sample.density[None, :-1])[0]  # [T-1, C]
        predicted = model.output(h[[a - 1 for a in sample.answer_slots]]).argmax(-1).tolist()
        right = sum(p == k for p, k in zip(predicted, key))
        results.append({"exact": right == DIGITS, "digits_right": right, "depth": sample.depth,
                        "source": sample.source})
    return results


def set_window(model: Transformer, window: int) -> None:
    model.config = model.config.replace(window=window)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step")
    parser.add_argument("--train-length", type=int, default=2048, help="tokens per training sample")
    parser.add_argument("--train-samples", type=int, default=80, help="training texts per source (x4 depths)")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="evaluation lengths")
    parser.add_argument("--eval-texts", type=int, default=4, help="held-out texts per source and length")
    parser.add_argument("--depths", type=int, default=10, help="pass-key depths per held-out text, 5-90%%")
    parser.add_argument("--lm-positions", type=int, default=128,
                        help="positions per step that add the language-model loss")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--dense", action="store_true", help="also train the dense-attention model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--log-every", type=int, default=50, help="log the losses every this many steps")
    parser.add_argument("--json", type=Path, help="write per-length summaries and per-sample results here")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.train_length, args.train_samples, args.eval_texts, args.depths) < 1:
        parser.error("--steps, --batch-size, --train-length, --train-samples, --eval-texts and --depths "
                     "must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    sources = load_sources()
    train_docs, eval_docs = {}, {}
    for name, docs in sources.items():
        train_docs[name], eval_docs[name] = train_val_split(docs, 0.2, args.seed)
    tokenizer = DensaTokenizer.train([d.text for docs in train_docs.values() for d in docs], 4096)
    digits = digit_ids(tokenizer)
    analyzer = DensityAnalyzer()

    train_samples = make_samples(train_docs, args.train_length, args.train_samples,
                                 lambda rng: [rng.uniform(0.02, 0.95) for _ in range(4)],
                                 tokenizer, analyzer, digits, args.seed)
    fixed_depths = [0.05 + 0.85 * i / max(args.depths - 1, 1) for i in range(args.depths)]
    eval_sets = {length: make_samples(eval_docs, length, args.eval_texts, lambda rng: fixed_depths,
                                      tokenizer, analyzer, digits, args.seed + 1)
                 for length in args.eval_lengths}
    sparsity = statistics.fmean(plan_blocks(s.density[:-1], PLAN).block_sparsity() for s in train_samples)
    window = matched_window(args.train_length - 1, sparsity, PLAN.block_size)
    log.info("%d training samples; density plans skip %.1f%% of blocks, sliding window %d; eval samples %s",
             len(train_samples), 100 * sparsity, window, {k: len(v) for k, v in eval_sets.items()})

    summaries, per_sample = [], []
    for attention in ("density", "sliding") + (("dense",) if args.dense else ()):
        model, seconds = train(attention, window, train_samples, tokenizer, digits, args)
        for length, samples in eval_sets.items():
            eval_sparsity = statistics.fmean(plan_blocks(s.density[:-1], PLAN).block_sparsity() for s in samples)
            eval_window = matched_window(length - 1, eval_sparsity, PLAN.block_size)
            if attention == "sliding":
                set_window(model, eval_window)
            results = answer_accuracy(model, samples, digits, args.seed + length)
            summary = {
                "attention": attention, "length": length, "samples": len(results),
                "accuracy": statistics.fmean(r["exact"] for r in results),
                "digit_accuracy": statistics.fmean(r["digits_right"] for r in results) / DIGITS,
                "block_sparsity": {"density": eval_sparsity, "dense": 0.0}.get(attention),
                "window": eval_window if attention == "sliding" else None,
                "train_seconds": round(seconds, 1), "steps": args.steps,
            }
            if attention == "sliding":
                summary["block_sparsity"] = BlockPlan.sliding(length - 1, eval_window, PLAN.block_size).block_sparsity()
            summaries.append(summary)
            per_sample += [dict(r, attention=attention, length=length) for r in results]
            print(f"{attention:<8} T={length:>6} accuracy {summary['accuracy']:.1%} "
                  f"digits {summary['digit_accuracy']:.1%} sparsity {summary['block_sparsity']:.1%}", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps({"summary": summaries, "samples": per_sample}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
