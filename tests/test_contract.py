"""Every registered criterion, built-in or installed, passes the contract check (timm-style)."""

import pytest

from prunebench import registry
from prunebench.testing import check_criterion


@pytest.mark.parametrize("name", registry.criteria.names())
def test_registered_criterion_meets_contract(name):
    report = check_criterion(name)
    assert abs(report["achieved"] - 0.3) <= (0.05 if report["kind"] == "transform" else 0.01)
    assert report["plan_steps"] >= 1
