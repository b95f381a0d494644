"""The declared feature schema: one encoder, loud about missing or unknown columns."""

from __future__ import annotations

import numpy as np
import pytest

from servegym.envs.engine.policy import (
    BUDGET_FEATURES,
    CANDIDATE_FEATURES,
    CONFIG_FEATURES,
    GLOBAL_FEATURES,
    PRIVILEGED_FEATURES,
    RETAIN_FEATURES,
    ROUTE_FEATURES,
)
from servegym.envs.engine.schema import (
    CANDIDATE,
    GLOBAL,
    TABLES,
    Feature,
    Scale,
    ScaleContext,
    Table,
    VllmReading,
)

SMALL = Table(
    "small",
    (
        Feature("flag", Scale.AS_IS, "a flag"),
        Feature("tokens_log", Scale.LOG1P, "tokens"),
        Feature("wait_s", Scale.TIME, "seconds"),
        Feature("blocks_frac", Scale.BLOCKS, "blocks"),
        Feature("budget_frac", Scale.TOKEN_BUDGET, "tokens of the budget"),
        Feature("unknowable", Scale.LOG1P, "what vLLM cannot see", "cannot", VllmReading.NEUTRAL, 0.5),
    ),
)
CONTEXT = ScaleContext(time_scale_s=30.0, num_blocks=200, max_num_batched_tokens=512)


def test_each_scale_is_applied_once_per_column() -> None:
    raw = {
        "flag": np.array([True, False]),
        "tokens_log": np.array([0, 99]),
        "wait_s": np.array([3.0, 60.0]),
        "blocks_frac": np.array([50, 200]),
        "budget_frac": 128,  # one value for every row
        "unknowable": np.array([7, 7]),
    }
    table = SMALL.encode(raw, CONTEXT, 2)
    assert table.dtype == np.float32 and table.shape == (2, 6)
    expected = [[1, 0, 0.1, 0.25, 0.25, np.log1p(7)], [0, np.log1p(99), 2.0, 1.0, 0.25, np.log1p(7)]]
    np.testing.assert_allclose(table, expected, rtol=1e-6)


def test_a_missing_column_is_an_error_unless_it_declares_a_neutral_value() -> None:
    raw = {"flag": 1, "tokens_log": 1, "wait_s": 1.0, "blocks_frac": 1, "budget_frac": 1}
    with pytest.raises(KeyError, match="'unknowable'"):
        SMALL.encode(raw, CONTEXT, 1)
    assert SMALL.encode(raw, CONTEXT, 1, neutral_for_missing=True)[0, 5] == 0.5
    with pytest.raises(KeyError, match="'flag'"):  # no neutral value: never silently zero
        SMALL.encode({k: v for k, v in raw.items() if k != "flag"}, CONTEXT, 1, neutral_for_missing=True)


def test_a_name_outside_the_schema_is_an_error() -> None:
    raw = {name: 0 for name in SMALL.names} | {"typo_log": 1}
    with pytest.raises(KeyError, match="typo_log"):
        SMALL.encode(raw, CONTEXT, 1)
    with pytest.raises(KeyError, match="unknown small feature"):
        SMALL.index("typo_log")


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Table("t", (Feature("a", Scale.AS_IS, ""), Feature("a", Scale.LOG1P, "")))
    with pytest.raises(ValueError, match="neutral"):
        Table("t", (Feature("a", Scale.AS_IS, "", "", VllmReading.EXACT, 0.0),))
    with pytest.raises(ValueError, match="neutral"):
        Table("t", (Feature("a", Scale.AS_IS, "", "", VllmReading.NEUTRAL),))


def test_the_name_tuples_everyone_imports_are_the_schema() -> None:
    assert [t.names for t in TABLES] == [
        CANDIDATE_FEATURES,
        PRIVILEGED_FEATURES,
        GLOBAL_FEATURES,
        ROUTE_FEATURES,
        RETAIN_FEATURES,
        CONFIG_FEATURES,
        BUDGET_FEATURES,
    ]
    for table in TABLES:
        for feature in table.features:
            assert feature.doc, f"{table.name}.{feature.name} says nothing"
            if table in (CANDIDATE, GLOBAL):
                assert feature.vllm, f"{table.name}.{feature.name}: how does the vLLM adapter read it?"
            # a scale's name is part of the column's: counts of tokens are *_log, times *_s
            if feature.scale is Scale.LOG1P:
                assert feature.name.endswith("_log"), feature.name
            if feature.scale in (Scale.BLOCKS, Scale.TOKEN_BUDGET):
                assert feature.name.endswith("_frac"), feature.name
