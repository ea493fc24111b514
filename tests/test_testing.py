"""The one acceptance rule (cuflash.testing) on hand-made numbers."""

import math

import numpy as np

from cuflash import reference, testing


def test_judge_is_compare_with_the_rule_atol():
    ref = np.array([1.0, 2.0])
    naive = np.array([1.0, 2.0])  # a lucky naive result: the bound is the atol alone
    atol = testing.rule_atol("bfloat16", 2.0)
    assert atol == testing.default_atol(testing.np_dtype("bfloat16")) + 0.5 * 2 ** -7 * 2.0
    assert testing.judge("x", ref + 0.9 * atol, ref, naive, dtype="bfloat16").ok
    assert not testing.judge("x", ref + 1.1 * atol, ref, naive, dtype="bfloat16").ok
    assert testing.judge("x", ref + 1.1 * atol, ref, naive, dtype="bfloat16",
                         allowance=atol).ok
    assert not testing.judge("x", np.array([math.nan, 2.0]), ref, naive, dtype="float32").ok


def test_judge_stats_is_relative_and_exact_on_infinities():
    ref = np.array([-np.inf, 10.0], dtype=np.float32)
    assert testing.judge_stats("m", np.array([-np.inf, 10.005], np.float32), ref,
                               dtype="bfloat16").ok
    assert not testing.judge_stats("m", np.array([-np.inf, 10.05], np.float32), ref,
                                   dtype="bfloat16").ok
    assert not testing.judge_stats("m", np.array([0.0, 10.0], np.float32), ref,
                                   dtype="float32").ok


def test_reference_keeps_the_rule_names():
    assert reference.compare is testing.compare and reference.default_atol is testing.default_atol
