"""Every configuration error names the dotted key, the value and what is allowed."""

from __future__ import annotations

import pytest

from oprd_mega.config import ConfigError
from tests.config.helpers import minimal

pytestmark = pytest.mark.filterwarnings("error")

# (overrides, dotted key, value as shown, a fragment saying what is allowed)
CASES = [
    (["distillation.method=opd"], "distillation.method", '"opd"', "'oprd', 'opd-top1'"),
    (["distillation.positions.mode=first"], "distillation.positions.mode", '"first"', "last_k"),
    (["distillation.positions.k=0"], "distillation.positions.k", "0", ">= 1"),
    (["distillation.layers=evens"], "distillation.layers", '"evens"', "last, all, even, odd"),
    (["distillation.layers=[0, 2]"], "distillation.layers", "[0, 2]", "1-based"),
    (["distillation.layers=[2, 2]"], "distillation.layers", "[2, 2]", "twice"),
    (["distillation.layers=[]"], "distillation.layers", "[]", "empty"),
    (["distillation.layers=[1.5]"], "distillation.layers", "[1.5]", "not an integer"),
    (["distillation.mu=-1"], "distillation.mu", "-1", "greater than or equal to 0"),
    (
        ["distillation.method=combined", "distillation.mu=0"],
        "distillation.mu",
        "0.0",
        "mu > 0",
    ),
    (["distillation.top_k=0"], "distillation.top_k", "0", "greater than or equal to 1"),
    (["distillation.opd=opd-top2"], "distillation.opd", '"opd-top2"', "'opd-topk'"),
    (["distillation.opd_chunk_tokens=0"], "distillation.opd_chunk_tokens", "0", "or equal to 1"),
    (["distillation.target_dtype=int8"], "distillation.target_dtype", '"int8"', "'bfloat16'"),
    (["distillation.loss_coef=0"], "distillation.loss_coef", "0", "greater than 0"),
    (["distillation.projection.mode=linear"], "distillation.projection.mode", '"linear"', "'full'"),
    (
        ["distillation.projection.mode=bridge", "distillation.normalize=true"],
        "distillation.projection.bridge_path",
        "null",
        "needs the bridge file",
    ),
    (
        ["distillation.projection.bridge_path=b.pt"],
        "distillation.projection.bridge_path",
        '"b.pt"',
        "only mode 'bridge'",
    ),
    (
        ["distillation.projection.mode=bridge", "distillation.projection.bridge_path=b.pt"],
        "distillation.normalize",
        "false",
        "normalize=true",
    ),
    (["distillation.projection.init_std=0"], "distillation.projection.init_std", "0", "than 0"),
    (
        ["distillation.kernel.normalize=true"],
        "distillation.kernel.normalize",
        "true",
        "set distillation.normalize instead",
    ),
    (
        ["distillation.kernel.workspace_bytes=0"],
        "distillation.kernel.workspace_bytes",
        "0",
        "positive",
    ),
    (["distillation.kernel.impl=cuda"], "distillation.kernel.impl", '"cuda"', "'triton'"),
    (["distillation.kernel.recompute=maybe"], "distillation.kernel.recompute", '"maybe"', "bool"),
    (["parallel.tp=0"], "parallel.tp", "0", "positive integer"),
    (["parallel.sp=true"], "parallel.sp", "true", "needs tp > 1"),
    (["parallel.pp=two"], "parallel.pp", '"two"', "valid integer"),
    (["student.dtype=fp8"], "student.dtype", '"fp8"', "'bfloat16'"),
    (["rollout.mode=remote"], "rollout.mode", '"remote"', "'attach'"),
    (["rollout.mode=attach"], "rollout.attach.urls", "[]", "router_url"),
    (["rollout.launch.num_servers=0"], "rollout.launch.num_servers", "0", ">= 1"),
    (["rollout.launch.backend=vllm"], "rollout.launch.backend", '"vllm"', "'embedded'"),
    (["rollout.client.max_retries=-1"], "rollout.client.max_retries", "-1", ">= 0"),
    (["rollout.sampling.n=0"], "rollout.sampling.n", "0", ">= 1"),
    (["rollout.sampling.top_p=0"], "rollout.sampling.top_p", "0", "(0, 1]"),
    (["rollout.sampling.temperature=-1"], "rollout.sampling.temperature", "-1", ">= 0"),
    (["rollout.sampling.min_p=2"], "rollout.sampling.min_p", "2", "[0, 1]"),
    (["rollout.sampling.temperature=hot"], "rollout.sampling.temperature", '"hot"', "number"),
    (
        ["rollout.sampling.stop_token_ids=[a]"],
        "rollout.sampling.stop_token_ids[0]",
        '"a"',
        "integer",
    ),
    (["rollout.weight_sync.method=nfs"], "rollout.weight_sync.method", '"nfs"', "'disk'"),
    (
        ["rollout.weight_sync.distributed.backend=mpi"],
        "rollout.weight_sync.distributed.backend",
        '"mpi"',
        "'nccl'",
    ),
    (
        ["rollout.weight_sync.bucket_bytes=0"],
        "rollout.weight_sync.bucket_bytes",
        "0",
        "greater than 0",
    ),
    (["data.path=prompts.csv"], "data.path", '"prompts.csv"', ".jsonl or .json or .parquet"),
    (["data.format=parquet"], "data.path", '"p.jsonl"', ".parquet"),
    (["data.on_too_long=truncate"], "data.on_too_long", '"truncate"', "'skip'"),
    (["data.max_prompt_length=0"], "data.max_prompt_length", "0", "greater than or equal to 1"),
    (["batch.prompts_per_step=0"], "batch.prompts_per_step", "0", "greater than or equal to 1"),
    (["optimizer.lr=0"], "optimizer.lr", "0", "greater than 0"),
    (["optimizer.name=sgd"], "optimizer.name", '"sgd"', "'adamw'"),
    (["optimizer.min_lr=1"], "optimizer.min_lr", "1.0", "<= lr"),
    (["optimizer.betas=[0.9, 1.0]"], "optimizer.betas[1]", "1.0", "[0, 1)"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "[0.9]", "expected [float, float]"),
    (["schedule.steps=0"], "schedule.steps", "0", "greater than or equal to 1"),
    (
        ["schedule.warmup_fraction=1.5"],
        "schedule.warmup_fraction",
        "1.5",
        "less than or equal to 1",
    ),
    (
        ["schedule.warmup_steps=3", "schedule.warmup_fraction=0.1"],
        "schedule.warmup_steps",
        "3",
        "not both",
    ),
    (["schedule.warmup_steps=600"], "schedule.warmup_steps", "600", "<= steps (500)"),
    (["schedule.warmup_fraction=null"], "schedule.warmup_fraction", "null", "warmup_steps"),
    (["schedule.decay=step"], "schedule.decay", '"step"', "'cosine'"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "0", "greater than or equal to 1"),
    (["checkpoint.resume=maybe"], "checkpoint.resume", '"maybe"', "'always'"),
    (["metrics.sinks=[stdout]"], "metrics.sinks[0]", '"stdout"', "'tensorboard'"),
    (["metrics.sinks=[jsonl, jsonl]"], "metrics.sinks", '["jsonl", "jsonl"]', "once"),
    (["evaluation.interval=10"], "evaluation.prompts", "null", "needs a prompt file"),
    (["evaluation.k=0"], "evaluation.k", "0", "greater than or equal to 1"),
    (["evaluation.sampling.n=3"], "evaluation.sampling.n", "3", "equal evaluation.k (16)"),
    (["evaluation.verifier=regex"], "evaluation.verifier", '"regex"', "'boxed'"),
    (["seed=-1"], "seed", "-1", "greater than or equal to 0"),
    # pydantic's lax mode would read true as 1 (one layer, one rank, one step)
    (["schedule.steps=true"], "schedule.steps", "true", "a number, not true/false"),
    (["optimizer.lr=false"], "optimizer.lr", "false", "a number, not true/false"),
    (["distillation.positions.k=true"], "distillation.positions.k", "true", "not true/false"),
    (["parallel.tp=true"], "parallel.tp", "true", "a number, not true/false"),
    (["parallel.teacher.tp=true"], "parallel.teacher.tp", "true", "a number, not true/false"),
    (
        ["student.pipeline_split.first=true"],
        "student.pipeline_split.first",
        "true",
        "a number, not true/false",
    ),
]


@pytest.mark.parametrize(
    "overrides, key, shown, allowed", CASES, ids=[c[1] + ":" + c[2] for c in CASES]
)
def test_error_names_key_value_and_what_is_allowed(
    overrides: list[str], key: str, shown: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        minimal(*overrides)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key} = {shown}: "), problems[0]
    assert allowed in problems[0], problems[0]


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("distillation.methd=oprd", "distillation.methd", "did you mean 'distillation.method'?"),
        (
            "rollout.sampling.tempreature=0.5",
            "rollout.sampling.tempreature",
            "did you mean 'rollout.sampling.temperature'?",
        ),
        (
            "distillation.positions.kk=3",
            "distillation.positions.kk",
            "did you mean 'distillation.positions.k'?",
        ),
        (
            "rollout.launch.num_server=2",
            "rollout.launch.num_server",
            "did you mean 'rollout.launch.num_servers'?",
        ),
        ("lr=1e-4", "lr", "did you mean 'optimizer.lr'?"),
        ("top_p=0.9", "top_p", "did you mean 'rollout.sampling.top_p'?"),
        ("optimiser.lr=1e-4", "optimiser", "did you mean 'optimizer'?"),
    ],
)
def test_unknown_keys_suggest_the_nearest(override: str, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        minimal(override)
    (problem,) = info.value.problems
    assert problem.startswith(f"{key} = "), problem
    assert "unknown key" in problem
    assert suggestion in problem
    assert "allowed keys: " in problem


def test_unknown_key_without_a_near_name_lists_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        minimal("checkpoint.zzz=1")
    (problem,) = info.value.problems
    assert "did you mean" not in problem
    assert "allowed keys: dir, interval, keep_last, resume, export_hf" in problem


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        minimal("optimizer.lr=-1", "parallel.tp=0", "distillation.bogus=1")
    keys = [p.split(" ")[0] for p in info.value.problems]
    assert sorted(keys) == ["distillation.bogus", "optimizer.lr", "parallel.tp"]
    assert str(info.value).startswith("invalid configuration (")
    assert "with overrides" in str(info.value)


def test_missing_keys_say_what_is_expected() -> None:
    from oprd_mega.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["student.dtype=float32"])
    text = "\n".join(info.value.problems)
    assert "student.path: required key is missing; expected str" in text
    assert "teacher: required key is missing; expected a section with keys: path, dtype" in text
    assert "rollout.launch.model_path" in text
    assert "defaults to student.path" in text


def test_messages_use_yaml_words() -> None:
    with pytest.raises(ConfigError) as info:
        minimal("rollout.sampling.stop=END", "rollout.launch.env=[1]")
    assert info.value.problems == [
        "rollout.launch.env = [1]: Input should be a mapping",
        'rollout.sampling.stop = "END": Input should be a list',
    ]
