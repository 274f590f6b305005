"""Dynamic load balancing across data-parallel replicas.

Each step every replica reports its utilisation, compute time / step time.
The step time here is the data-parallel phase, which lasts until the slowest
replica has finished its forward and backward passes. The optimizer and other
fixed costs do not change with the shares, so they are left out.
Against a target utilisation (0.9 by default), a replica below 80% of the
target gets a larger share of the global batch (weight x1.2) and one above
120% a smaller share (weight x0.8); the shares are then rescaled so that the
global batch stays the same. The unit of work is a row of the batch without
pipelining, and a whole micro-batch with it (micro-batch size never changes).

Gradients stay exact with unequal shares because each replica sums its token
losses and divides by the global token count (see engine.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def apportion(weights: list[float], total: int, minimum: int = 1) -> list[int]:
    """Split `total` units in proportion to `weights`, at least `minimum` each (largest-remainder method)."""
    n = len(weights)
    if total < n * minimum:
        raise ValueError(f"cannot give {n} workers at least {minimum} of {total} units; raise the global batch")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    spare = total - n * minimum
    scale = sum(weights)
    exact = [spare * w / scale for w in weights]
    shares = [int(x) for x in exact]
    # Hand the units lost to rounding down to the largest remainders; ties go to the lower index.
    order = sorted(range(n), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: spare - sum(shares)]:
        shares[i] += 1
    return [minimum + s for s in shares]


@dataclass
class LoadBalancer:
    """Shares of a fixed global batch, updated from measured utilisation.

    Every rank runs the same update on the same all-gathered utilisations,
    so all ranks agree on the split without further communication.
    """

    total_units: int
    n_workers: int
    target: float = 0.9
    low: float = 0.8  # fraction of target below which a worker gets more work
    high: float = 1.2  # fraction of target above which a worker gets less work
    grow: float = 1.2
    shrink: float = 0.8
    weights: list[float] = field(default_factory=list)
    split: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_workers < 1 or self.total_units < self.n_workers:
            raise ValueError(
                f"{self.total_units} units cannot be shared by {self.n_workers} workers; "
                "each needs at least one unit"
            )
        if not 0 < self.target <= 1:
            raise ValueError(f"target utilisation {self.target} is invalid; use a fraction in (0, 1]")
        if not self.weights:
            self.weights = [1.0] * self.n_workers
        self.split = apportion(self.weights, self.total_units)

    def offsets(self) -> list[int]:
        """First unit of each worker's share."""
        starts, position = [], 0
        for share in self.split:
            starts.append(position)
            position += share
        return starts

    def update(self, utilisation: list[float]) -> list[int]:
        """Adjust the weights from one utilisation per worker and return the new split."""
        if len(utilisation) != self.n_workers:
            raise ValueError(f"expected {self.n_workers} utilisation values, got {len(utilisation)}")
        for i, u in enumerate(utilisation):
            if u < self.low * self.target:
                self.weights[i] *= self.grow
            elif u > self.high * self.target:
                self.weights[i] *= self.shrink
        scale = sum(self.weights)
        self.weights = [w / scale for w in self.weights]
        split = apportion(self.weights, self.total_units)
        if split != self.split:
            logger.info("load balancer: utilisation %s -> split %s", [round(u, 2) for u in utilisation], split)
        self.split = split
        return split

    def set_split(self, split: list[int]) -> None:
        """Fix the shares by hand (weights follow them), e.g. to replay a measured split."""
        if len(split) != self.n_workers or sum(split) != self.total_units or min(split) < 1:
            raise ValueError(
                f"split {split} is invalid; give {self.n_workers} positive shares summing to {self.total_units}"
            )
        self.split = list(split)
        self.weights = [s / self.total_units for s in split]

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "split": list(self.split)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["weights"]) != self.n_workers:
            # A different dp degree after a restart: start from an even split.
            logger.info("load balancer: %d saved shares for %d workers; starting even",
                        len(state["weights"]), self.n_workers)
            return
        self.weights = [float(w) for w in state["weights"]]
        self.split = apportion(self.weights, self.total_units)
