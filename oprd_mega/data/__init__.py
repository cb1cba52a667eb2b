"""Prompt datasets and the microbatch scheduler."""
