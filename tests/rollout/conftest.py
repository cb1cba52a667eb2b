"""Shared fixtures: a tiny model directory and a running embedded server on a free port."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.tiny_hf import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama with tokenizer, saved once per session."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with different random weights."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model-2"), seed=1)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    """An embedded server on 127.0.0.1 and a free port, stopped after the module."""
    from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

    srv = EmbeddedServer(ServerConfig(str(tiny_model_dir), host="127.0.0.1", port=0, seed=1234))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir: Path):
    """transformers' own model for the tiny directory: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def other_model(other_model_dir: Path):
    """transformers' model for the second directory."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(other_model_dir), dtype=torch.float32)
    return model.eval()
