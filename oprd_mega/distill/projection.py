"""Student-to-teacher projections: identity, a trainable ``full`` map, or the frozen bridge.

* ``identity``: equal widths, the student state is compared as is.
* ``full``: a trainable ``W`` [d_T, d_S] per tapped layer (or one shared map). It is a real
  parameter of the student model chunk (attribute :data:`PROJECTION_ATTR`), so Megatron's DDP
  reduces its gradient, the optimizer updates it and checkpoints hold it. Weight sync and HF
  export must skip it: :func:`is_projection_param` / :data:`PROJECTION_PREFIX`.
* ``bridge``: frozen ``P_S`` per student layer, linear [r, d_S] or a small MLP
  (Linear-GELU-Linear, the bridge file's ``student_map: mlp``); the teacher ships
  ``P_T (h_T - mu_T)`` [r] per token (see :mod:`oprd_mega.distill.teacher`).

Every projection answers :meth:`project`: ``(inputs, weight)`` for the fused loss, the student
rows with the linear map to fuse (``full``, linear bridge) or the MLP's r-dim output with no
weight (the MLP runs on the supervised rows only, under autograd, so its gradient reaches them).

Initialisation is seeded per layer and independent of the parallel layout, so every layout
starts from the same maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from oprd_mega.distill.options import ProjectionSpec
from oprd_mega.parallel.model_groups import global_groups, groups_of

PROJECTION_ATTR = "oprd_projection"
PROJECTION_PREFIX = f"{PROJECTION_ATTR}."
SHARED_KEY = "shared"


def is_projection_param(name: str) -> bool:
    """Whether a (possibly DDP-wrapped) parameter name belongs to the OPRD projection.

    These parameters train with the student but are never synced to rollout servers nor
    exported to Hugging Face.
    """
    return name.startswith(PROJECTION_PREFIX) or f".{PROJECTION_PREFIX}" in name


def _key(layer: int) -> str:
    return f"layer_{layer}"


class FullProjection(torch.nn.Module):
    """Trainable maps ``W`` [d_T, d_S], one per tapped student layer or one shared.

    Parameters are replicated across tensor-parallel ranks; under sequence parallelism each rank
    sees a different sequence shard, so they carry ``sequence_parallel`` and Megatron sums their
    gradients across the tensor-parallel group, as for norm weights. ``groups``: the student's
    process groups, where its checkpoint shards live (default: ``parallel_state``'s).
    """

    def __init__(
        self,
        layers: Iterable[int],
        d_student: int,
        d_teacher: int,
        *,
        per_layer: bool,
        sequence_parallel: bool,
        dtype: torch.dtype = torch.float32,
        init_std: float | None = None,
        seed: int = 0,
        groups: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__()
        self.per_layer = per_layer
        self.groups = groups
        std = d_student**-0.5 if init_std is None else init_std
        keys = [(_key(layer), layer) for layer in layers] if per_layer else [(SHARED_KEY, 0)]
        self.weights = torch.nn.ParameterDict()
        for key, layer in keys:
            generator = torch.Generator().manual_seed(seed * 100003 + layer)
            value = torch.randn(d_teacher, d_student, generator=generator) * std
            param = torch.nn.Parameter(value.to(dtype))
            param.sequence_parallel = sequence_parallel  # type: ignore[attr-defined]
            param.tensor_model_parallel = False  # type: ignore[attr-defined]
            self.weights[key] = param
        if torch.cuda.is_available():
            self.cuda(torch.cuda.current_device())

    def weight_for(self, layer: int) -> torch.Tensor:
        """The map applied to student layer ``layer``."""
        return self.weights[_key(layer) if self.per_layer else SHARED_KEY]

    def project(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, W)``: the kernel fuses the map."""
        return rows, self.weight_for(layer)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """Replicated tensors; a shared map held by every pipeline stage is a replica there."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        groups = global_groups() if self.groups is None else self.groups
        replica = (
            groups.pp.rank() if not self.per_layer else 0,
            groups.tp.rank(),
            groups.dp_cp.rank(),
        )
        out = {}
        for key, param in self.weights.items():
            name = f"{prefix}weights.{key}"
            out[name] = ShardedTensor.from_rank_offsets(name, param, replica_id=replica)
        return out


_MLP_TENSORS = ("mlp_in", "mlp_in_bias", "mlp_out")


class BridgeProjection(torch.nn.Module):
    """Frozen ``P_S`` per student layer (buffers: no gradient, no optimizer state): the linear
    ``[r, d_S]`` as ``layer_{l}``, an MLP as ``layer_{l}_mlp_in`` / ``_mlp_in_bias`` /
    ``_mlp_out``."""

    def __init__(
        self,
        student_maps: dict[int, dict[str, torch.Tensor]],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for layer, tensors in student_maps.items():
            for name, value in tensors.items():
                buffer = _key(layer) if name == "P_S" else f"{_key(layer)}_{name}"
                self.register_buffer(buffer, value.detach().to(device, dtype).clone())

    def weight_for(self, layer: int) -> torch.Tensor | None:
        """The linear P_S of student layer ``layer`` (None for an MLP map)."""
        return getattr(self, _key(layer), None)

    def project(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rows, P_S)`` for a linear map; ``(MLP(rows), None)`` for an MLP map."""
        weight = self.weight_for(layer)
        if weight is not None:
            return rows, weight
        if not hasattr(self, f"{_key(layer)}_mlp_in"):
            raise KeyError(f"bridge projection: no P_S for student layer {layer} on this stage")
        w_in, b_in, w_out = (getattr(self, f"{_key(layer)}_{name}") for name in _MLP_TENSORS)
        hidden = F.gelu(F.linear(rows.to(w_in.dtype), w_in, b_in))
        return F.linear(hidden, w_out), None


@dataclass
class BridgeTensors:
    """A bridge's frozen maps as the step takes them: per student layer the tensors of P_S
    (``P_S`` [r, d_S], or ``mlp_in`` / ``mlp_in_bias`` / ``mlp_out``), per teacher layer
    ``(P_T [r, d_T], mu_T [d_T])``. The bridge package reads and checks the file."""

    student: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    teacher: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class ProjectionSet(torch.nn.ModuleDict):
    """The projections of several teachers, by teacher name (``oprd_projection.<name>.``)."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for name, module in self.items():
            out.update(
                sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata)
            )
        return out


def projection_of(model: torch.nn.Module, name: str | None = None) -> torch.nn.Module | None:
    """The projection attached to the (unwrapped) student chunk: the only one (``name`` None),
    or teacher ``name``'s among several; None for identity."""
    module = getattr(model, PROJECTION_ATTR, None)
    if isinstance(module, ProjectionSet):
        return module[name] if name is not None and name in module else None
    return module


def attach_projection(
    model: torch.nn.Module,
    spec: ProjectionSpec,
    stage_layers: list[int],
    d_student: int,
    d_teacher: int,
    *,
    sequence_parallel: bool,
    bridge: BridgeTensors | None = None,
    name: str | None = None,
) -> torch.nn.Module | None:
    """Add this stage's projection to the (unwrapped) student chunk; call before DDP wrapping.

    ``stage_layers``: the tapped student layers this pipeline stage owns. A shared ``full`` map
    lives on every stage (its gradients are summed over the pipeline group by the step).
    ``bridge``: the maps of mode ``bridge`` (read by :func:`oprd_mega.bridge.loaded.load_bridge`).
    ``name``: the teacher's name when the student learns from several (each projection then
    lives in a :class:`ProjectionSet` under its teacher's name); None: the only teacher.
    Returns the module, or None for ``identity``.
    """
    if spec.mode == "identity":
        if d_student != d_teacher:
            raise ValueError(
                f"projection.mode: identity needs equal widths, student {d_student} != "
                f"teacher {d_teacher}; use 'full' or 'bridge'"
            )
        return None
    existing = getattr(model, PROJECTION_ATTR, None)
    if existing is not None and (name is None or not isinstance(existing, ProjectionSet)):
        raise ValueError(f"the student model already has an {PROJECTION_ATTR!r} module")
    if name is not None and existing is not None and name in existing:
        raise ValueError(f"the student model already has a projection for teacher {name!r}")
    dtype = next(model.parameters()).dtype
    if spec.mode == "full":
        module: torch.nn.Module = FullProjection(
            stage_layers,
            d_student,
            d_teacher,
            per_layer=spec.per_layer,
            sequence_parallel=sequence_parallel,
            dtype=dtype,
            init_std=spec.init_std,
            seed=spec.seed,
            groups=groups_of(model),
        )
    else:
        if bridge is None:
            raise ValueError(f"projection.bridge_path: the bridge {spec.bridge_path} is not loaded")
        device = next(model.parameters()).device
        module = BridgeProjection(
            {layer: bridge.student[layer] for layer in stage_layers}, device, dtype
        )
    if name is None:
        setattr(model, PROJECTION_ATTR, module)
    else:
        if existing is None:
            existing = ProjectionSet()
            setattr(model, PROJECTION_ATTR, existing)
        existing[name] = module
    return module
