import math

import pytest

from editserve.server.config import ServeConfig
from editserve.server.drift_budget import DriftBudget


@pytest.mark.parametrize(("kl", "top1", "named"), [
    (-0.1, 0.0, "max_drift.max_kl"), (math.nan, 0.0, "max_drift.max_kl"), (math.inf, 0.0, "max_drift.max_kl"),
    (101.0, 0.0, "max_drift.max_kl"), (0.0, 1.5, "max_drift.min_top1_agreement"),
    (0.0, math.nan, "max_drift.min_top1_agreement"), (True, 0.0, "max_drift.max_kl"),
])
def test_out_of_range_or_non_finite_budgets_are_refused_by_name(kl, top1, named):
    with pytest.raises(ValueError, match=rf"^{named} must be a finite number in \[0, "):
        DriftBudget(kl, top1)


def test_the_server_default_is_checked_under_its_own_names():
    with pytest.raises(ValueError, match="max_drift_kl must be"):
        ServeConfig(max_drift_kl=-1.0)
    with pytest.raises(ValueError, match="min_drift_top1_agreement must be"):
        ServeConfig(min_drift_top1_agreement=2.0)
    assert not ServeConfig().drift_budget.active
    assert ServeConfig(max_drift_kl=0.5).drift_budget.active


def test_a_request_replaces_only_the_fields_it_sets():
    default = DriftBudget(0.5, 0.9, ("max_drift_kl", "min_drift_top1_agreement"))
    merged = default.over(DriftBudget(0.1, 0.0))
    assert (merged.max_kl, merged.min_top1_agreement) == (0.1, 0.9)
    assert merged.names == ("max_drift.max_kl", "min_drift_top1_agreement")  # each figure named where it came from
    assert default.over(None) is default


def test_violations_name_the_figure_and_nan_is_over():
    budget = DriftBudget(0.05, 0.9)
    assert budget.violation(0.05, 0.9, 63) == ""
    assert budget.violation(0.06, 1.0, 63).startswith("max_drift.max_kl: with this edit the mean KL on the 63")
    assert budget.violation(0.01, 0.8, 63).startswith("max_drift.min_top1_agreement:")
    assert budget.violation(math.nan, 1.0, 63) != ""
    assert DriftBudget().violation(99.0, 0.0, 63) == ""  # no limit


@pytest.mark.parametrize(("options", "named"), [
    ({"journal_url": "mysql://db/x"}, "journal_url must start with"),
    ({"journal_url": "postgresql://" + "x" * 5000}, "journal_url is over the limit of 4096"),
    ({"journal_password_file": "/etc/hostname"}, "journal_password_file needs journal_url"),
    ({"journal_url": "postgresql://db/x", "journal_password_file": "/nonexistent/pw"}, "no such file"),
    ({"journal_poll_seconds": math.nan}, r"journal_poll_seconds must be in \[0.05, 300.0\]"),
    ({"journal_poll_seconds": 0.0}, r"journal_poll_seconds must be in \[0.05, 300.0\]"),
    ({"journal_poll_seconds": True}, r"journal_poll_seconds must be in"),
    ({"max_bundle_mb": 0}, r"max_bundle_mb must be an integer in \[1, 65536\]"),
    ({"max_bundle_mb": 1.5}, r"max_bundle_mb must be an integer"),
])
def test_fleet_and_bundle_settings_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        ServeConfig(**options)
