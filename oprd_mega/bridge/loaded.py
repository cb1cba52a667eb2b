"""A bridge file read for training: P_S per student layer, P_T and mu_T per teacher layer,
checked against the models and layer pairs of the run, and handed to the distillation step as
plain tensors (:class:`oprd_mega.distill.projection.BridgeTensors`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oprd_mega.distill.projection import BridgeTensors

from .file import (
    BridgeMetadata,
    BridgeMismatchError,
    ModelIdentity,
    check_bridge_models,
    load_bridge_file,
)
from .student_map import StudentMap


@dataclass
class Bridge:
    """An OPRD-Bridge as the step uses it: P_S per student layer, P_T and mu_T per teacher
    layer (rank r), and the file's metadata when read from one."""

    student: dict[int, StudentMap] = field(default_factory=dict)  # layer -> frozen P_S
    teacher: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    metadata: BridgeMetadata | None = None

    @property
    def rank(self) -> int:
        """The bridge rank r."""
        return next(iter(self.student.values())).rank

    def tensors(self) -> BridgeTensors:
        """The maps as the distillation step takes them (plain tensors)."""
        return BridgeTensors(
            student={layer: m.tensors() for layer, m in self.student.items()},
            teacher=dict(self.teacher),
        )


def load_bridge(path: str | Path) -> Bridge:
    """Read a bridge file written by :func:`~oprd_mega.bridge.file.save_bridge_file` (stage 1,
    ``tools/build_bridge.py``); errors name ``projection.bridge_path`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projection.bridge_path: bridge file not found: {path}")
    try:
        loaded = load_bridge_file(path)
    except BridgeMismatchError as exc:
        raise ValueError(f"projection.bridge_path: {exc}") from exc
    return Bridge(
        student={layer: m.requires_grad_(False) for layer, m in loaded.student.items()},
        teacher=dict(loaded.teacher),
        metadata=loaded.metadata,
    )


def check_bridge(
    bridge: Bridge, pairs: list[tuple[int, int]], d_student: int, d_teacher: int, where: str
) -> None:
    """Every supervised pair has maps of matching rank and widths."""
    for student_layer, teacher_layer in pairs:
        if student_layer not in bridge.student:
            raise ValueError(f"{where}: no P_S for student layer {student_layer}")
        if teacher_layer not in bridge.teacher:
            raise ValueError(f"{where}: no P_T/mu_T for teacher layer {teacher_layer}")
        p_s = bridge.student[student_layer]
        p_t, mu_t = bridge.teacher[teacher_layer]
        if p_s.d_student != d_student:
            raise ValueError(
                f"{where}: student.{student_layer}.P_S maps [{p_s.d_student}] -> [{p_s.rank}], "
                f"expected [{d_student}] -> [r]"
            )
        if p_t.shape != (p_s.rank, d_teacher) or mu_t.shape != (d_teacher,):
            raise ValueError(
                f"{where}: teacher.{teacher_layer}.P_T {list(p_t.shape)} / mu_T "
                f"{list(mu_t.shape)} do not match r={p_s.rank}, d_T={d_teacher}"
            )


def check_bridge_against(
    bridge: Bridge | str | Path,
    student_args: Any,
    teacher_args: Any,
    pairs: list[tuple[int, int]],
    where: str = "projection.bridge_path",
) -> Bridge:
    """The bridge (loaded when given a path), checked against the models it will be used with
    (``HFModelArgs`` of both): widths, depths, vocabularies, config hashes and the layer pairs
    recorded in its metadata, then every pair's tensor shapes. Raises ``ValueError`` naming
    ``where`` and every mismatch; returns the bridge."""
    if not isinstance(bridge, Bridge):
        bridge = load_bridge(bridge)
    if bridge.metadata is not None:
        check_bridge_models(
            bridge.metadata,
            ModelIdentity.from_args(student_args, "student"),
            ModelIdentity.from_args(teacher_args, "teacher"),
            pairs=pairs,
            where=where,
        )
    check_bridge(bridge, pairs, student_args.hidden_size, teacher_args.hidden_size, where)
    return bridge
