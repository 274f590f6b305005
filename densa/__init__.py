"""densa: density-adaptive attention for long-context language models."""

import os

# The block-sparse CPU kernel runs many short parallel regions. With OpenMP's
# default spin-waiting, a 16K-token forward on 2 threads took 5.6 s on a
# shared 2-core machine instead of 0.6 s, because idle threads burned the cores
# that the working ones needed. OpenMP reads this variable only when torch's
# libraries load, so it takes effect when densa is imported before torch; set
# it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
