"""Moved to ``tools/tiny_hf.py`` (tools must not import tests); kept for tests written against
the old path until the branches are merged."""

from tools.tiny_hf import CHAT_TEMPLATE, make_tiny_model_dir, make_tokenizer

__all__ = ["CHAT_TEMPLATE", "make_tiny_model_dir", "make_tokenizer"]
