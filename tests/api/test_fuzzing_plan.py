"""FUZZ_SEED and FUZZ_EXAMPLES: a fixed run by default, a longer or random one on request."""

from __future__ import annotations

from tests.api.fuzzing import DEFAULT_EXAMPLES, DEFAULT_SEED, DEFAULT_TIMEOUT_S, FuzzPlan


def test_the_default_run_is_fixed_and_time_limited() -> None:
    plan = FuzzPlan.from_env({})
    assert (plan.seed, plan.examples, plan.timeout_s) == (DEFAULT_SEED, DEFAULT_EXAMPLES,
                                                          DEFAULT_TIMEOUT_S)


def test_a_longer_run_has_its_own_seed_and_no_time_limit() -> None:
    plan = FuzzPlan.from_env({"FUZZ_SEED": "1234", "FUZZ_EXAMPLES": "500"})
    assert (plan.seed, plan.examples, plan.timeout_s) == (1234, 500, 0)


def test_a_random_seed_differs_between_runs() -> None:
    seeds = {FuzzPlan.from_env({"FUZZ_SEED": "random"}).seed for _ in range(5)}
    assert len(seeds) > 1
