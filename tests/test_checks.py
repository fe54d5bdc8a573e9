"""sdpo_fast.utils.checks: the one finiteness predicate the argument checks, the data guards and the API share."""
import math

import pytest

from sdpo_fast.utils.checks import check_number, is_finite_number


@pytest.mark.parametrize("value,finite", [(0, True), (-3, True), (2.5, True), (1e308, True), (10 ** 400, False),
                                          (-10 ** 400, False), (math.inf, False), (math.nan, False), (True, False),
                                          ("1", False), (None, False)])
def test_is_finite_number(value, finite):
    assert is_finite_number(value) is finite


def test_check_number_names_the_argument_for_an_int_too_large_for_a_float():
    with pytest.raises(ValueError, match="lr must be"):
        check_number("lr", 10 ** 400)
