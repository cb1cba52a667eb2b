"""Test-session set-up shared by the whole suite."""

import os

import torch

# Triton kernels run through the interpreter on CPU; the variable must be set before any
# kernel is defined (scripts/test.sh exports it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
