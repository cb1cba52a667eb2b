"""Test-session set-up shared by the whole suite."""

import os

import torch
from hypothesis import settings

# Two shared cores make wall-clock deadlines flaky; examples stay bounded by max_examples.
settings.register_profile("oprd", deadline=None, print_blob=True)
settings.load_profile("oprd")

# Triton kernels run through the interpreter on CPU; the variable must be set before any
# kernel is defined (scripts/test.sh exports it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Skip tests marked ``gpu`` when CUDA is absent."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
