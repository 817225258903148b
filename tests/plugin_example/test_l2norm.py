"""The plug-in's own test: one call checks the criterion against prunebench's contract."""

from prunebench_example.l2norm import L2Norm

from prunebench.testing import check_criterion


def test_l2norm_meets_the_contract():
    report = check_criterion(L2Norm)
    assert report["kind"] == "score"
