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
            return ast.get_source_segment(text, node) or ""
    raise LookupError(f"sglang {SGLANG_VERSION}: no function or class {name} in {member}")


def sglang_function(member: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """SGLang's function ``name`` from ``member``, defined in an isolated namespace."""
    scope: dict[str, Any] = {"__name__": f"sglang_pinned.{name}", **namespace}
    exec(compile(function_source(member, name), f"<sglang {member}:{name}>", "exec"), scope)
    return scope[name]


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
