"""Fixtures of the TT kernel tests."""

from __future__ import annotations

import pytest
import torch

from kernels import tt_native


@pytest.fixture(params=[True, False], ids=["native", "torch"])
def native_kernels(request, monkeypatch) -> bool:
    """Run the test on the native CPU TT kernels (skipped where they cannot be built) and on the torch path
    (``RECSYS_TT_NATIVE=0``): ``kernels.tt`` must pick the right path for the inputs either way."""
    on: bool = request.param
    monkeypatch.setenv(tt_native.ENV_VAR, "1" if on else "0")
    if on and tt_native.ops() is None:
        pytest.skip("native TT kernels could not be built")
    assert tt_native.available(torch.zeros(1)) == on
    return on
