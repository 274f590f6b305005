"""Block plans: which kernel blocks get full attention and how wide each window is.

A plan is computed once per sequence from token densities and consumed by every
attention backend, so the mask semantics below live in one place.

Mask semantics (the rule every backend implements exactly). For query token q
and key token k, with `dense[t]` true when token t lies in a high-density block
and `window[t]` the sliding-window width (in tokens) of t's block:

    allowed(q, k) = visible(q, k) and (dense[q] or dense[k] or |q - k| < window[q])

where `visible(q, k)` is `k <= q` for causal attention and always true for
bidirectional attention. In words: a query in a high-density block attends to
every key it may see; any other query attends to the keys inside its window and
to every key of a high-density block.

Legend: T tokens, N kernel blocks (N = ceil(T / block_size)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PlanConfig:
    """Settings that turn token densities into a block plan.

    A kernel block is high-density when at least `min_dense_fraction` of its
    tokens have density >= `threshold` and it ranks among the densest
    `max_dense_fraction` of the sequence's blocks (by that share, rounded up to
    whole blocks); consecutive such blocks form one dense stretch. The cap
    keeps the cost bounded: each dense block adds a full row and a full column
    of key blocks, so at 16K tokens in 128-token blocks a 2% cap keeps block
    sparsity near 90%. A low-density block's window shrinks linearly from
    `near_window[1]` to `near_window[0]` over the first `near_tokens` tokens of
    distance from the closest dense block, then from `far_window[1]` to
    `far_window[0]` between `near_tokens` and `far_tokens`. Windows are in tokens.
    """

    threshold: float = 0.7
    block_size: int = 128
    near_window: tuple[int, int] = (128, 256)
    far_window: tuple[int, int] = (32, 64)
    near_tokens: int = 256
    far_tokens: int = 1024
    min_dense_fraction: float = 0.1
    max_dense_fraction: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} is invalid; use a value in (0, 1]")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size={self.block_size} is invalid; use a power of two >= 16, such as 128"
            )
        for name in ("near_window", "far_window"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(
                    f"{name}={(low, high)} is invalid; use (min, max) with 1 <= min <= max tokens"
                )
        if not 0 < self.near_tokens < self.far_tokens:
            raise ValueError(
                f"near_tokens={self.near_tokens}, far_tokens={self.far_tokens} are invalid; "
                "use 0 < near_tokens < far_tokens"
            )
        for name in ("min_dense_fraction", "max_dense_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is invalid; use a value in [0, 1]")


@dataclass(frozen=True)
class BlockPlan:
    """Per-block attention pattern for one sequence of `seq_len` tokens.

    `dense` is a bool tensor [N]; `window` is an int64 tensor [N] holding each
    block's sliding window in tokens (ignored where `dense` is true). Both live
    on the CPU; backends move what they need.
    """

    seq_len: int
    block_size: int
    dense: torch.Tensor
    window: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.n_blocks
        if self.dense.shape != (n,) or self.window.shape != (n,):
            raise ValueError(
                f"plan for {self.seq_len} tokens in blocks of {self.block_size} needs {n} blocks, "
                f"got dense {tuple(self.dense.shape)} and window {tuple(self.window.shape)}"
            )
        if self.dense.dtype != torch.bool:
            raise ValueError(f"dense must be a bool tensor, got {self.dense.dtype}")
        if (self.window[~self.dense] < 1).any():
            raise ValueError("every low-density block needs a window of at least 1 token")

    @property
    def n_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @classmethod
    def sliding(cls, seq_len: int, window: int, block_size: int = 128) -> "BlockPlan":
        """Plain sliding-window attention as a plan with no dense blocks."""
        n = -(-seq_len // block_size)
        return cls(
            seq_len,
            block_size,
            torch.zeros(n, dtype=torch.bool),
            torch.full((n,), window, dtype=torch.long),
        )

    @classmethod
    def full(cls, seq_len: int, block_size: int = 128) -> "BlockPlan":
        """Dense attention as a plan where every block is high-density."""
        n = -(-seq_len // block_size)
        return cls(seq_len, block_size, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long))

    def token_dense(self) -> torch.Tensor:
        """Bool tensor [T]: whether each token lies in a high-density block."""
        return self.dense.repeat_interleave(self.block_size)[: self.seq_len]

    def token_window(self) -> torch.Tensor:
        """Int64 tensor [T]: the window of each token's block (0 for dense blocks)."""
        window = torch.where(self.dense, torch.zeros_like(self.window), self.window)
        return window.repeat_interleave(self.block_size)[: self.seq_len]

    def mask_mod(self, causal: bool = True, device: torch.device | str = "cpu"):
        """Return `mask(b, h, q_idx, kv_idx) -> bool tensor`, the rule in the module docstring.

        The signature matches FlexAttention's `mask_mod`, and the function
        broadcasts over index tensors, so the reference backend uses it too.
        """
        dense = self.token_dense().to(device)
        window = self.token_window().to(device)

        def mask(b, h, q_idx, kv_idx):
            near = (q_idx - kv_idx).abs() < window[q_idx]
            allowed = dense[q_idx] | dense[kv_idx] | near
            if causal:
                allowed = allowed & (kv_idx <= q_idx)
            return allowed

        return mask

    def _key_ranges(self, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the key-block ranges of each query block: (low [N], high [N], dense_prefix [N + 1]).

        Query block i computes the contiguous key blocks low[i]..high[i] plus
        every high-density key block outside that range. For a high-density
        query block the range is every visible key block. `dense_prefix[j]`
        counts the high-density blocks before block j. O(N).
        """
        n, bs = self.n_blocks, self.block_size
        blocks = torch.arange(n)
        q_first = blocks * bs
        q_last = torch.clamp(q_first + bs - 1, max=self.seq_len - 1)
        # A window of w tokens reaches back to token q_first - (w - 1) and,
        # bidirectionally, forward to q_last + (w - 1).
        reach = (self.window - 1).clamp(min=0)
        low = torch.div((q_first - reach).clamp(min=0), bs, rounding_mode="floor")
        high = blocks if causal else torch.div((q_last + reach).clamp(max=self.seq_len - 1), bs, rounding_mode="floor")
        low = torch.where(self.dense, 0, low)
        high = torch.where(self.dense, blocks if causal else n - 1, high)
        dense_prefix = torch.cat([torch.zeros(1, dtype=torch.long), self.dense.long().cumsum(0)])
        return low, high, dense_prefix

    def block_counts(self, causal: bool = True) -> torch.Tensor:
        """Count the key blocks each query block computes: int64 [N], in O(N) time."""
        return self._counts(*self._key_ranges(causal), causal)

    @staticmethod
    def _counts(low: torch.Tensor, high: torch.Tensor, dense_prefix: torch.Tensor, causal: bool) -> torch.Tensor:
        # Dense key blocks below the range, the range itself and, unless
        # causal, the dense key blocks above it.
        above = 0 if causal else dense_prefix[-1] - dense_prefix[high + 1]
        return dense_prefix[low] + (high - low + 1) + above

    def key_blocks(self, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (counts [N], indices [N, K]): the key blocks each query block must compute.

        Row i of `indices` lists, in ascending order, the `counts[i]` key blocks
        that hold at least one allowed key for some query of block i; the rest
        of the row is padding with -1 (K = counts.max()). This padded layout is
        the one FlexAttention's BlockMask takes. Each row is the high-density
        blocks below the window range, the range, then (bidirectional only) the
        high-density blocks above it, so every entry is computed directly: no sort and no N x N
        boolean table, and the work is the size of the output.
        """
        key = ("key_blocks", causal)
        if key in self._cache:
            return self._cache[key]
        low, high, dense_prefix = self._key_ranges(causal)
        counts = self._counts(low, high, dense_prefix, causal)
        width = int(counts.max()) if self.n_blocks else 0
        dense_blocks = self.dense.nonzero().flatten()
        col = torch.arange(width)[None, :]  # [1, K]
        below = dense_prefix[low][:, None]  # [N, 1]: dense blocks before the range
        span = (high - low + 1)[:, None]
        in_range = low[:, None] + (col - below)
        # Index into dense_blocks for the parts below and above the range;
        # clamped so the unused branches stay in bounds.
        dense_col = torch.where(col < below, col, dense_prefix[high + 1][:, None] + (col - below - span))
        dense_pick = dense_blocks[dense_col.clamp(0, max(len(dense_blocks) - 1, 0))] if len(dense_blocks) else dense_col
        indices = torch.where((col >= below) & (col < below + span), in_range, dense_pick)
        indices = torch.where(col < counts[:, None], indices, -1)
        self._cache[key] = (counts, indices)
        return counts, indices

    def computed_blocks(self, causal: bool = True) -> int:
        return int(self.block_counts(causal).sum())

    def total_blocks(self, causal: bool = True) -> int:
        """Blocks that dense attention computes: the lower triangle when causal."""
        n = self.n_blocks
        return n * (n + 1) // 2 if causal else n * n

    def block_sparsity(self, causal: bool = True) -> float:
        """Fraction of dense attention's blocks that this plan skips."""
        return 1.0 - self.computed_blocks(causal) / self.total_blocks(causal)

    def ideal_speedup(self, causal: bool = True) -> float:
        """Dense blocks / computed blocks: the speed-up of a kernel with no overhead."""
        return self.total_blocks(causal) / self.computed_blocks(causal)

    def dense_fraction(self) -> float:
        return float(self.dense.float().mean()) if self.n_blocks else 0.0


def _distance_to_dense(dense: torch.Tensor) -> torch.Tensor:
    """Blocks between each block and the closest dense block (0 for dense blocks).

    Two linear scans; `n` (the block count) stands for "no dense block".
    """
    n = dense.numel()
    flags = dense.tolist()
    before = [n] * n
    last = None
    for i in range(n):
        if flags[i]:
            last = i
        if last is not None:
            before[i] = i - last
    after = [n] * n
    nxt = None
    for i in range(n - 1, -1, -1):
        if flags[i]:
            nxt = i
        if nxt is not None:
            after[i] = nxt - i
    return torch.tensor([min(a, b) for a, b in zip(before, after)], dtype=torch.long)


def plan_blocks(density: torch.Tensor, config: PlanConfig | None = None) -> BlockPlan:
    """Build the block plan for one sequence from its token densities [T] in [0, 1]."""
    config = config or PlanConfig()
    density = torch.as_tensor(density, dtype=torch.float32).flatten()
    seq_len = density.numel()
    if seq_len == 0:
        raise ValueError("cannot plan an empty sequence; pass at least one token density")
    if not torch.isfinite(density).all() or density.min() < 0 or density.max() > 1:
        raise ValueError("densities must be finite values in [0, 1]")

    bs = config.block_size
    n = -(-seq_len // bs)
    above = torch.zeros(n * bs)
    above[:seq_len] = (density >= config.threshold).float()
    valid = torch.zeros(n * bs)
    valid[:seq_len] = 1.0
    fraction = above.view(n, bs).sum(1) / valid.view(n, bs).sum(1)
    budget = math.ceil(config.max_dense_fraction * n)
    candidates = fraction >= config.min_dense_fraction
    dense = torch.zeros(n, dtype=torch.bool)
    if budget and candidates.any():
        # Stable sort keeps the earlier block first among equal shares.
        ranked = torch.sort(torch.where(candidates, fraction, -1.0), descending=True, stable=True).indices
        chosen = ranked[:budget]
        dense[chosen[candidates[chosen]]] = True

    # Distance in tokens from the nearest edge of the closest dense block:
    # adjacent blocks are at distance 0. With no dense block at all, every
    # block counts as far from one.
    if dense.any():
        gap_blocks = _distance_to_dense(dense)
        distance = ((gap_blocks - 1).clamp(min=0) * bs).float()
    else:
        distance = torch.full((n,), float(config.far_tokens))

    window = window_for_distance(distance, config)
    window = torch.where(dense, torch.zeros_like(window), window)
    return BlockPlan(seq_len, bs, dense, window)


def window_for_distance(distance: torch.Tensor, config: PlanConfig) -> torch.Tensor:
    """Window in tokens [int64] for low-density blocks at `distance` tokens from dense text."""
    near_low, near_high = config.near_window
    far_low, far_high = config.far_window
    near_t = (distance / config.near_tokens).clamp(max=1.0)
    near = near_high - (near_high - near_low) * near_t
    far_t = ((distance - config.near_tokens) / (config.far_tokens - config.near_tokens)).clamp(0.0, 1.0)
    far = far_high - (far_high - far_low) * far_t
    return torch.where(distance <= config.near_tokens, near, far).round().long()


def generated_window(plan: BlockPlan, position: int, config: PlanConfig) -> int:
    """Window in tokens of a generated token at `position` (at or past the plan's end).

    Generated tokens count as low-density: their density is unknown until the
    text exists. The window follows the same distance rule as the prompt's
    low-density blocks, measured from the last dense block of the plan.
    """
    block = position // plan.block_size
    dense_blocks = plan.dense.nonzero().flatten()
    if len(dense_blocks) == 0:
        distance = float(config.far_tokens)
    else:
        distance = float(max(block - int(dense_blocks[-1]) - 1, 0) * plan.block_size)
    return int(window_for_distance(torch.tensor([distance]), config)[0])
