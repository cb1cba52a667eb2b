"""Moved to ``tools/tiny_hf_models.py`` (tools must not import tests); kept for tests written
against the old path until the branches are merged."""

from tools.tiny_hf_models import THETA, TINY, make_tiny_model

__all__ = ["THETA", "TINY", "make_tiny_model"]
