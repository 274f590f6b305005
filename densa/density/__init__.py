"""Semantic density of tokens and the block plans built from it."""

from densa.density.analyzer import DensityAnalyzer, DensityConfig, DensityResult
from densa.density.plan import BlockPlan, PlanConfig, plan_blocks
from densa.density.syntax import JiebaRuleTagger, SyntaxTagger

__all__ = [
    "BlockPlan",
    "DensityAnalyzer",
    "DensityConfig",
    "DensityResult",
    "JiebaRuleTagger",
    "PlanConfig",
    "SyntaxTagger",
    "plan_blocks",
]
