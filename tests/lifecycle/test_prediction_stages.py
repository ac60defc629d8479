"""Stages decided by P(alive): the policy's rules and their validation."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from services.lifecycle.stages import Facts, StagePolicy, stage_of

NOW = datetime(2026, 6, 1, tzinfo=UTC)
RULES = StagePolicy.model_validate(
    {"sleeping_rule": {"p_alive_below": 0.3}, "churned_rule": {"p_alive_below": 0.1}}
)


def facts(days: int, p_alive: float | None, frequency: int = 3) -> Facts:
    return Facts(frequency, NOW - timedelta(days=days), None, p_alive)


@pytest.mark.parametrize(
    ("days", "p_alive", "stage"),
    [
        (5, 0.01, "after_sale"),  # the care window comes first
        (60, 0.01, "active"),  # so does the active window
        (100, 0.5, "silent"),
        (100, 0.3, "silent"),  # the bound belongs to the stage above
        (100, 0.29, "sleeping"),
        (100, 0.05, "churned"),
        (400, 0.9, "silent"),  # a year without a purchase, yet likely still a customer
        (400, None, "churned"),  # no figure: the day counts
        (150, None, "silent"),
    ],
)
def test_stage_by_p_alive(days: int, p_alive: float | None, stage: str) -> None:
    assert stage_of(facts(days, p_alive), NOW, RULES) == stage


def test_without_rules_p_alive_is_ignored() -> None:
    assert stage_of(facts(100, 0.01), NOW, StagePolicy()) == "silent"
    assert stage_of(facts(400, 0.99), NOW, StagePolicy()) == "churned"


def test_sleeping_rule_alone_never_churns() -> None:
    policy = StagePolicy.model_validate({"sleeping_rule": {"p_alive_below": 0.3}})
    assert stage_of(facts(100, 0.001), NOW, policy) == "sleeping"


@pytest.mark.parametrize(
    "body",
    [
        {"sleeping_rule": {"p_alive_below": 0}},
        {"sleeping_rule": {"p_alive_below": 1}},
        {"sleeping_rule": {"p_alive_below": "0.3"}},
        {"sleeping_rule": {"p_alive_below": 0.3, "extra": 1}},
        {"churned_rule": {"p_alive_below": 0.1}},
        {"sleeping_rule": {"p_alive_below": 0.2}, "churned_rule": {"p_alive_below": 0.2}},
    ],
)
def test_invalid_rules_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StagePolicy.model_validate_json(json.dumps(body))
