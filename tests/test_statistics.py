"""Confidence intervals and the claims table (lth.reporting.statistics) on rows shaped like collect()'s."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lth.reporting.statistics import MARGIN, claims, mean_ci, one_sided_p


def rows(accuracy: dict[tuple[str, int], list[float]], iterations: dict[tuple[str, int], list[int]] | None = None):
    """One metrics row per (kind, round, trial) from per-trial accuracies (and early-stop iterations)."""
    out: list[dict[str, Any]] = []
    for (kind, k), values in accuracy.items():
        for trial, value in enumerate(values):
            its = (iterations or {}).get((kind, k), [1000] * len(values))
            out.append(
                {
                    "kind": kind,
                    "round": k,
                    "trial": trial,
                    "percent_remaining": 100 * 0.8**k,
                    "test_accuracy_at_early_stop": value,
                    "early_stop_iteration": its[trial],
                    "test_accuracy_final": value,
                    "val_loss_at_early_stop": 0.1,
                }
            )
    return out


def test_mean_ci_is_the_student_t_interval():
    values = [0.97, 0.98, 0.985, 0.975]
    mean, low, high = mean_ci(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    t_975_3 = 3.182446305284263  # Student's t, 3 degrees of freedom, 97.5th percentile (tables)
    assert mean == pytest.approx(0.9775)
    assert high - mean == pytest.approx(t_975_3 * sd / 2) and mean - low == pytest.approx(t_975_3 * sd / 2)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)


def test_one_sided_p_follows_the_sign_and_size_of_the_differences():
    assert one_sided_p([0.01, 0.012, 0.009]) < 0.01
    assert one_sided_p([-0.01, -0.012, -0.009]) > 0.99
    assert 0.05 < one_sided_p([0.01, -0.008, 0.002]) < 0.95
    assert one_sided_p([0.01]) is None
    assert one_sided_p([0.01, 0.01]) == 0.0 and one_sided_p([0.0, 0.0]) == 1.0


@pytest.mark.parametrize(
    ("ticket", "control", "claim", "holds"),
    [
        ([0.98, 0.981, 0.979], [0.95, 0.952, 0.949], "ticket beats random reinitialization", True),
        ([0.98, 0.981, 0.979], [0.981, 0.979, 0.98], "ticket beats random reinitialization", False),
        ([0.98, 0.981, 0.979], [0.95, 0.952, 0.949], "ticket beats random pruning", True),
        ([0.98], [0.95], "ticket beats random reinitialization", None),
    ],
)
def test_claims_against_controls(ticket, control, claim, holds):
    kind = "reinit" if "reinit" in claim else "random_pruning"
    table = claims(rows({("ticket", 0): [0.98] * len(ticket), ("ticket", 3): ticket, (kind, 3): control}))
    (found,) = [c for c in table if c.name == claim]
    assert found.round == 3 and found.percent_remaining == pytest.approx(51.2)
    assert found.holds is holds
    row = found.row()
    assert row["pairs"] == len(ticket)
    assert row["mean_difference"] == pytest.approx(sum(ticket) / len(ticket) - sum(control) / len(control))
    assert row["ci_low"] <= row["mean_difference"] <= row["ci_high"]


def test_non_inferiority_to_the_dense_network_allows_the_margin_only():
    dense = [0.980, 0.982, 0.979]
    slightly_below = [d - MARGIN / 4 for d in [0.980, 0.9821, 0.9788]]
    far_below = [d - 3 * MARGIN for d in dense]
    for ticket, holds in ((slightly_below, True), (far_below, False)):
        (found,) = [
            c
            for c in claims(rows({("ticket", 0): dense, ("ticket", 1): ticket}))
            if c.name == "ticket at least as accurate as dense"
        ]
        assert found.holds is holds, (ticket, found.row())


def test_learning_faster_compares_early_stop_iterations_paired_by_trial():
    accuracy = {("ticket", 0): [0.98] * 3, ("ticket", 2): [0.98] * 3, ("reinit", 2): [0.97] * 3}
    faster = {("ticket", 2): [3000, 4000, 3500], ("reinit", 2): [8000, 9100, 8700]}
    (found,) = [c for c in claims(rows(accuracy, faster)) if c.name == "ticket learns faster than reinitialization"]
    assert found.differences == [5000, 5100, 5200] and found.holds is True
    assert found.row()["effect_size"] == pytest.approx(5100 / 100)


def test_report_shows_confidence_intervals_and_the_claims_table(tmp_path):
    from lth.core.hparams import Hparams
    from lth.reporting import aggregate, html
    from tests.helpers import Cells

    accuracy = {
        ("ticket", 0): [0.980, 0.982, 0.979],
        ("ticket", 1): [0.983, 0.984, 0.982],
        ("reinit", 1): [0.975, 0.976, 0.974],
    }
    data = rows(accuracy)
    page = html.render(Hparams(), aggregate.aggregate(data), tmp_path, None, claims(data))
    claims_table, key_table = Cells("claims"), Cells("key-table")
    claims_table.feed(page)
    key_table.feed(page)
    verdicts = {r[0]: r[-1] for r in claims_table.rows if r}
    assert verdicts == {
        "ticket at least as accurate as dense": "yes",
        "ticket beats random reinitialization": "yes",
        "ticket learns faster than reinitialization": "no",  # equal early-stop iterations
    }
    mean, low, high = mean_ci(accuracy[("ticket", 1)])
    assert f"{mean:.4f} [{low:.4f}, {high:.4f}]" in [c for r in key_table.rows for c in r]
    assert "paired one-sided t-test" in page
