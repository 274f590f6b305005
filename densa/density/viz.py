"""Pictures of token density and block plans (matplotlib, written as PNG)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from densa.density.plan import BlockPlan  # noqa: E402
from densa.io import atomic_path  # noqa: E402


def save_density_heatmap(
    density: torch.Tensor,
    plan: BlockPlan,
    path: str | os.PathLike,
    title: str = "token density",
    row_tokens: int | None = None,
) -> None:
    """Draw density [T] as a grid (one row per `row_tokens` tokens) above the block plan.

    Rows default to one kernel block each, so the strip beside the grid lines
    up with the plan: dense blocks in red, low-density blocks in grey, darker
    for wider windows.
    """
    T = density.numel()
    row_tokens = row_tokens or plan.block_size
    rows = -(-T // row_tokens)
    grid = torch.full((rows * row_tokens,), float("nan"))
    grid[:T] = density.float()
    grid = grid.view(rows, row_tokens)  # [rows, row_tokens]

    fig, (ax_grid, ax_plan) = plt.subplots(
        1, 2, figsize=(10, max(3.0, rows * 0.08 + 1.5)), gridspec_kw={"width_ratios": [12, 1]}, sharey=True
    )
    image = ax_grid.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax_grid.set_xlabel(f"token within row ({row_tokens} tokens a row)")
    ax_grid.set_ylabel("row")
    ax_grid.set_title(f"{title}\nblock sparsity {plan.block_sparsity():.1%}, dense blocks {plan.dense_fraction():.1%}")
    fig.colorbar(image, ax=ax_grid, fraction=0.03, pad=0.01, label="density")

    # One cell per row: the plan of the block holding the row's first token.
    first_tokens = torch.arange(rows) * row_tokens
    blocks = first_tokens // plan.block_size
    dense = plan.dense[blocks]
    widest = max(float(plan.window.max()), 1.0)
    grey = 0.9 - 0.6 * plan.window[blocks].float() / widest  # 0.9 (narrow) to 0.3 (widest)
    strip = torch.stack([grey, grey, grey], dim=-1)  # [rows, 3] RGB
    strip[dense] = torch.tensor([0.85, 0.1, 0.1])
    ax_plan.imshow(strip[:, None, :].numpy(), aspect="auto", interpolation="nearest")
    ax_plan.set_xticks([])
    ax_plan.set_title("plan", fontsize=9)
    ax_plan.set_xlabel(f"red: dense\ngrey: window\n(darker = wider,\nmax {int(widest)})", fontsize=7)
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
