"""Values that used to be accepted without a word: non-finite numbers, ports past 65535, a
config file that is not UTF-8. Each is a ConfigError naming the key (or file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oprd_mega.config import ConfigError, load_config
from tests.config.helpers import minimal


@pytest.mark.parametrize(
    "override",
    [
        "optimizer.lr=.inf",
        "optimizer.lr=.nan",
        "distillation.mu=.inf",
        "rollout.sampling.temperature=.nan",
        "rollout.client.timeout_s=.inf",
    ],
)
def test_non_finite_numbers_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        minimal(override)
    assert [p for p in info.value.problems if p.startswith(key)], info.value.problems


@pytest.mark.parametrize(("base", "servers"), [(70000, 1), (65535, 2), (0, 1)])
def test_server_ports_past_65535_are_refused(base: int, servers: int) -> None:
    # LaunchConfig's own check, reported under the config key.
    with pytest.raises(ConfigError, match=rf"rollout\.launch\.base_port = {base}: .*1\.\.65535"):
        minimal(f"rollout.launch.base_port={base}", f"rollout.launch.num_servers={servers}")
    minimal("rollout.launch.base_port=65534", "rollout.launch.num_servers=2")  # the last port


def test_a_config_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path, [])
    assert str(path) in str(info.value) and "not UTF-8" in str(info.value)
    assert "0xe9" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["rollout.partial_chunk_tokens=4"], "needs rollout.partial = true"),
        (
            ["rollout.max_staleness=1", "rollout.partial=true", "rollout.partial_chunk_tokens=0"],
            "greater than or equal to 1",
        ),
    ],
)
def test_a_partial_chunk_needs_partial_rollouts_and_a_positive_size(
    overrides: list[str], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        minimal(*overrides)
    problems = [p for p in info.value.problems if p.startswith("rollout.partial_chunk_tokens")]
    assert problems and fragment in problems[0], info.value.problems
    config = minimal(
        "rollout.max_staleness=1", "rollout.partial=true", "rollout.partial_chunk_tokens=4"
    )
    assert config.rollout.partial_chunk_tokens == 4
