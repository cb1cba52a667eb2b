"""Single functions and classes of SGLang's own source, from the pinned wheel, without sglang.

``sglang_function(member, name, namespace)`` parses ``member`` (a file of the wheel) with
``ast``, takes the top-level function or class ``name`` and executes only that definition in a
fresh namespace holding ``namespace`` (the module globals it needs), so a test runs SGLang's
code, not a copy of it.
"""

from __future__ import annotations

import ast
import base64
import io
import sys
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
from packaging import version as pkg_version

from .sglang_schema import SGLANG_VERSION, fetch_member

COMMON_MEMBER = "sglang/srt/utils/common.py"


def function_source(member: str, name: str) -> str:
    """The source text of the top-level function or class ``name`` in ``member``."""
    path = fetch_member(member)
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "\n".join(text.splitlines()[first - 1 : node.end_lineno])  # with decorators
    raise LookupError(f"sglang {SGLANG_VERSION}: no function or class {name} in {member}")


def sglang_function(member: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """SGLang's function ``name`` from ``member``, defined in an isolated namespace."""
    return sglang_definitions(member, [name], namespace, f"sglang_pinned.{name}")[name]


def sglang_definitions(
    member: str, names: list[str], namespace: dict[str, Any], module: str
) -> dict[str, Any]:
    """SGLang's top-level functions or classes ``names`` from ``member``, defined in order in
    one isolated namespace whose ``__name__`` is ``module`` (so they can refer to each other)."""
    scope: dict[str, Any] = {"__name__": module, **namespace}
    for name in names:
        exec(compile(function_source(member, name), f"<sglang {member}:{name}>", "exec"), scope)
    return {name: scope[name] for name in names}


def sglang_init_custom_process_group() -> Callable[..., Any]:
    """``sglang.srt.utils.common.init_custom_process_group``; its one module global is
    ``torch_release``, computed as common.py computes it."""
    torch_release = pkg_version.parse(torch.__version__).release
    return sglang_function(
        COMMON_MEMBER, "init_custom_process_group", {"torch_release": torch_release}
    )


def sglang_multiprocessing_serializer() -> Any:
    """``sglang.srt.utils.common.MultiprocessingSerializer``, what SGLang's clients use to build
    /update_weights_from_tensor payloads. Its ``serialize`` needs ``io``, ``ForkingPickler`` and
    ``pybase64`` (given as the standard ``base64``: same ``b64encode``)."""
    namespace = {"io": io, "ForkingPickler": ForkingPickler, "pybase64": base64}
    return sglang_function(COMMON_MEMBER, "MultiprocessingSerializer", namespace)


TENSOR_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"


def tensor_bucket_modules() -> dict[str, Any]:
    """Stand-in ``sys.modules`` entries for ``sglang.srt.weight_sync.tensor_bucket`` and its
    parent packages: dataclasses and pickle look a class's module up there by name."""
    import types

    parts = TENSOR_BUCKET_MODULE.split(".")
    return {
        ".".join(parts[:i]): types.ModuleType(".".join(parts[:i])) for i in range(1, len(parts) + 1)
    }


def sglang_flattened_tensor_bucket() -> Any:
    """``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket`` (what slime builds its
    ``flattened_bucket`` payloads with), defined under SGLang's module name, which must be in
    ``sys.modules`` (:func:`tensor_bucket_modules`): a pickle of its metadata record then names
    the class as SGLang's own does."""
    from dataclasses import dataclass

    defined = sglang_definitions(
        "sglang/srt/weight_sync/tensor_bucket.py",
        ["FlattenedTensorMetadata", "FlattenedTensorBucket"],
        {"dataclass": dataclass, "List": list, "Tuple": tuple, "torch": torch},
        TENSOR_BUCKET_MODULE,
    )
    module = sys.modules[TENSOR_BUCKET_MODULE]
    module.FlattenedTensorMetadata = defined["FlattenedTensorMetadata"]
    module.FlattenedTensorBucket = defined["FlattenedTensorBucket"]
    return defined["FlattenedTensorBucket"]
