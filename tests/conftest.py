"""Test set-up: Triton runs through its interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before ``triton.jit`` decorates anything, hence before any
seqrec_fast import. ``cuda``-marked tests skip without a GPU. With SEQREC_FAST_REQUIRE_EXT=1
(set by .ci/run) a missing C++ extension is an error, so its tests can never skip silently.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import seqrec_fast  # noqa: E402


def pytest_configure(config):
    if os.environ.get("SEQREC_FAST_REQUIRE_EXT", "0") == "1" and seqrec_fast._ext._C is None:
        raise pytest.UsageError("SEQREC_FAST_REQUIRE_EXT=1 but the C++ extension did not load: "
                                f"{seqrec_fast._ext.LOAD_ERROR}")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
