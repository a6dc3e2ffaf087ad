"""How much and how the fuzz tests run: examples, seed, time limit, from FUZZ_* variables.

Deterministic by default, so CI fails the same way twice: a fixed seed and a few examples per
operation, well inside CI's time budget. For a longer, random run:

    FUZZ_SEED=random FUZZ_EXAMPLES=500 scripts/test tests/api -m fuzz

A failure names the seed (`FUZZ_SEED=<n>` reproduces it). No tests here.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import hypothesis
from hypothesis import HealthCheck

DEFAULT_SEED = 8  # the issue that brought fuzzing in; any fixed number does
DEFAULT_EXAMPLES = 20
# Per test item, for the default run; a long run has none (pytest-timeout's 0).
DEFAULT_TIMEOUT_S = 120

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class FuzzPlan:
    """The seed and example count of this run."""

    seed: int
    examples: int
    is_default: bool

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FuzzPlan:
        env = os.environ if environ is None else environ
        raw_seed = env.get("FUZZ_SEED", "").strip()
        raw_examples = env.get("FUZZ_EXAMPLES", "").strip()
        if raw_seed == "random":
            seed = random.SystemRandom().randrange(2**32)
        else:
            seed = int(raw_seed) if raw_seed else DEFAULT_SEED
        examples = int(raw_examples) if raw_examples else DEFAULT_EXAMPLES
        return cls(seed=seed, examples=examples, is_default=not raw_seed and not raw_examples)

    @property
    def timeout_s(self) -> int:
        return DEFAULT_TIMEOUT_S if self.is_default else 0

    def apply(self, test: F, examples: int | None = None) -> F:
        """`test` (a Hypothesis @given function) with this plan's seed and settings."""
        configured = hypothesis.settings(
            max_examples=examples or self.examples,
            deadline=None,  # requests cross a socket; their time says nothing about the code
            database=None,  # no replay of old failures: a run depends on the seed alone
            derandomize=False,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                   HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture],
        )(test)
        return hypothesis.seed(self.seed)(configured)

    def note(self, exc: BaseException) -> None:
        """Tell the reader of a failure how to run it again."""
        exc.add_note(f"FUZZ_SEED={self.seed} FUZZ_EXAMPLES={self.examples} reproduces this run")


PLAN = FuzzPlan.from_env()
