"""The suite fails when sdpo_fast's own code calls an API that raises a DeprecationWarning or FutureWarning
(tests/conftest.py), and only then: a test's own call to a deprecated API is not ours."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DEPRECATED_MODEL = '''
import warnings

import torch


class OldModel(torch.nn.Module):
    """Has only the deprecated name, as an old release would, and it warns as transformers 5.25's alias does."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
        warnings.warn("`activation_checkpointing_enable` is deprecated", FutureWarning)
'''


@pytest.mark.parametrize("caller, failed", [("sdpo_fast", 1), ("test", 0)])
def test_deprecated_call_fails_only_from_own_code(pytester, caller, failed):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    call = ("from sdpo_fast.model import enable_checkpointing\n    enable_checkpointing(OldModel())"
            if caller == "sdpo_fast" else "OldModel().activation_checkpointing_enable()")
    pytester.makepyfile(DEPRECATED_MODEL + f"\n\ndef test_call():\n    {call}\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1 - failed, failed=failed)
    if failed:
        result.stdout.fnmatch_lines(["*sdpo_fast calls a deprecated API:", "FutureWarning at *deprecated"])
