"""The soak (see soak.py), under pytest only when FORKEXEC_SOAK=1: it takes minutes."""

import os

import pytest

from . import soak

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("FORKEXEC_SOAK") != "1",
                       reason="the soak runs only with FORKEXEC_SOAK=1"),
]


@pytest.mark.timeout(3600)
def test_soak(capsys):
    with capsys.disabled():   # the figures are the point: show them
        print()
        ok, figures = soak.run()
    assert ok, figures
