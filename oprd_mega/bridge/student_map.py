"""The student-side map P_S: [tokens, d_S] -> [tokens, r], fitted to the teacher's P_T (h_T - mu_T).

Linear (no bias, as the distillation step applies it) or a small MLP, trained with AdamW on
mini-batches with a cosine learning-rate decay, a held-out split and early stopping on the
held-out mean squared error. Inputs are whitened by the inverse square root of their
(uncentred) second-moment matrix during training, a preconditioner for the large means and
outlier features of LLM states, and the whitening is folded into the first weight afterwards, so
the exported map applies to raw states. The targets are divided by their RMS while training
(a scalar, so the objective is unchanged) and the scale is folded into the last weight.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

MapKind = Literal["linear", "mlp"]


@dataclass(frozen=True)
class FitConfig:
    """Options of one P_S fit (errors name the field)."""

    kind: MapKind = "linear"
    mlp_hidden: int = 256
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 0.0
    heldout_fraction: float = 0.1
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"fit.kind: {self.kind!r} is not 'linear' or 'mlp'")
        for name in ("mlp_hidden", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"fit.{name}: must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"fit.lr / fit.weight_decay: got {self.lr} / {self.weight_decay}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(
                f"fit.heldout_fraction: must be in [0, 1), got {self.heldout_fraction}"
            )


class StudentMap(torch.nn.Module):
    """P_S as a module: ``linear`` [r, d_S] without bias, or Linear-GELU-Linear."""

    def __init__(self, d_student: int, rank: int, kind: MapKind = "linear", hidden: int = 256):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net: torch.nn.Module = torch.nn.Linear(d_student, rank, bias=False)
        else:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(d_student, hidden),
                torch.nn.GELU(),
                torch.nn.Linear(hidden, rank, bias=False),
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[tokens, d_S] -> [tokens, r] (computed in the map's dtype)."""
        return self.net(hidden.to(self.first.weight.dtype))

    @property
    def first(self) -> torch.nn.Linear:
        """The layer that reads the student state."""
        return self.net if isinstance(self.net, torch.nn.Linear) else self.net[0]  # type: ignore[return-value,index]

    @property
    def last(self) -> torch.nn.Linear:
        """The layer that writes the r-dim output."""
        return self.net if isinstance(self.net, torch.nn.Linear) else self.net[2]  # type: ignore[return-value,index]

    @property
    def d_student(self) -> int:
        """The student width the map reads."""
        return int(self.first.weight.shape[1])

    @property
    def rank(self) -> int:
        """The bridge rank r the map writes."""
        return int(self.last.weight.shape[0])

    def weight(self) -> torch.Tensor:
        """The linear P_S [r, d_S]; an error for an MLP."""
        if self.kind != "linear":
            raise ValueError("StudentMap.weight: an MLP map has no single [r, d_S] matrix")
        return self.first.weight.detach()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for the bridge file: ``P_S``, or ``mlp_in``/``mlp_in_bias``/``mlp_out``."""
        if self.kind == "linear":
            return {"P_S": self.weight().contiguous()}
        net = self.net
        return {
            "mlp_in": net[0].weight.detach().contiguous(),  # type: ignore[index]
            "mlp_in_bias": net[0].bias.detach().contiguous(),  # type: ignore[index]
            "mlp_out": net[2].weight.detach().contiguous(),  # type: ignore[index]
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> StudentMap:
        """Inverse of :meth:`tensors`; ``where`` names the file/layer in errors."""
        if set(tensors) == {"P_S"}:
            rank, d_student = tensors["P_S"].shape
            module = cls(d_student, rank, "linear")
            module.first.weight.data.copy_(tensors["P_S"])
            return module
        if set(tensors) == {"mlp_in", "mlp_in_bias", "mlp_out"}:
            hidden, d_student = tensors["mlp_in"].shape
            module = cls(d_student, tensors["mlp_out"].shape[0], "mlp", hidden)
            net = module.net
            net[0].weight.data.copy_(tensors["mlp_in"])  # type: ignore[index]
            net[0].bias.data.copy_(tensors["mlp_in_bias"])  # type: ignore[index]
            net[2].weight.data.copy_(tensors["mlp_out"])  # type: ignore[index]
            return module
        raise ValueError(f"{where}: P_S tensors {sorted(tensors)} are neither linear nor MLP")


def mean_cosine(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over rows of cos(prediction, target), both [tokens, r], in float64."""
    a, b = prediction.to(torch.float64), target.to(torch.float64)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)
    return float(cos.mean())


@dataclass
class FitResult:
    """A fitted map with its learning curve and held-out cosines before and after training."""

    map: StudentMap
    train_loss: list[float] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    cosine_before: float = math.nan
    cosine_after: float = math.nan


def split_rows(rows: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) row indices; the held-out part has round(rows * fraction) rows
    (at least one when fraction > 0 and rows > 1)."""
    permutation = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    heldout = min(max(round(rows * fraction), 1 if fraction > 0 else 0), rows - 1)
    return permutation[heldout:], permutation[:heldout]


def whitening_matrix(rows: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """S^(-1/2) [d, d] (float64) for S = rows^T rows / n + ridge * mean eigenvalue * I."""
    x = rows.to(torch.float64)
    second = x.t() @ x / x.shape[0]
    values, vectors = torch.linalg.eigh(second)
    values = values.clamp_min(0) + ridge * float(values.clamp_min(0).mean()) + 1e-30
    return (vectors * values.rsqrt()) @ vectors.t()


def _mse(module: StudentMap, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((module(inputs) - targets) ** 2).mean())


def fit_student_map(
    student: torch.Tensor, targets: torch.Tensor, config: FitConfig | None = None
) -> FitResult:
    """Fit P_S on student rows [tokens, d_S] to targets [tokens, r] = P_T (h_T - mu_T).

    Trains in float32 on the inputs' device; the held-out split is used for early stopping and
    for the reported cosines (the training rows when ``heldout_fraction`` is 0).
    """
    config = FitConfig() if config is None else config
    if student.dim() != 2 or targets.dim() != 2 or student.shape[0] != targets.shape[0]:
        raise ValueError(
            f"fit_student_map: student {list(student.shape)} and targets "
            f"{list(targets.shape)} must be [tokens, d_S] and [tokens, r] with equal tokens"
        )
    if student.shape[0] < 2:
        raise ValueError(f"fit_student_map: {student.shape[0]} row(s); at least 2 are needed")
    device = student.device
    inputs = student.detach().to(torch.float32)
    targets = targets.detach().to(device, torch.float32)
    train, heldout = split_rows(inputs.shape[0], config.heldout_fraction, config.seed)
    if heldout.numel() == 0:
        heldout = train
    train, heldout = train.to(device), heldout.to(device)
    whitening = whitening_matrix(inputs[train]).to(device, torch.float32)
    scaled = inputs @ whitening
    # One scalar brings the targets to unit RMS (the objective only scales); with whitened
    # inputs the optimum is O(1), within reach of AdamW's bounded steps.
    target_scale = float(targets[train].to(torch.float64).pow(2).mean().sqrt()) or 1.0
    targets = targets / target_scale
    torch.manual_seed(config.seed)
    module = StudentMap(inputs.shape[1], targets.shape[1], config.kind, config.mlp_hidden)
    module = module.to(device)
    result = FitResult(module)
    result.cosine_before = _cosine(module, scaled[heldout], targets[heldout])
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(train.numel() / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            0.5 * (1 + math.cos(math.pi * min(step / (config.epochs * steps_per_epoch), 1)))
        ),
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    best = (math.inf, copy.deepcopy(module.state_dict()), 0)
    for epoch in range(1, config.epochs + 1):
        order = train[torch.randperm(train.numel(), generator=generator).to(device)]
        total = 0.0
        for start in range(0, order.numel(), config.batch_size):
            index = order[start : start + config.batch_size]
            loss = ((module(scaled[index]) - targets[index]) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * index.numel()
        result.train_loss.append(total / order.numel())
        result.train_loss[-1] *= target_scale**2  # losses are reported in target units
        result.heldout_loss.append(
            _mse(module, scaled[heldout], targets[heldout]) * target_scale**2
        )
        if result.heldout_loss[-1] < best[0]:
            best = (result.heldout_loss[-1], copy.deepcopy(module.state_dict()), epoch)
        elif epoch - best[2] >= config.patience:
            break
    module.load_state_dict(best[1])
    result.best_epoch = best[2]
    with torch.no_grad():
        # Fold the whitening (symmetric) and the target scale: the map reads raw states.
        module.first.weight.copy_(module.first.weight @ whitening)
        last = module.net if config.kind == "linear" else module.net[2]  # type: ignore[index]
        last.weight.mul_(target_scale)  # type: ignore[union-attr,operator]
    targets = targets * target_scale
    result.cosine_after = _cosine(module, inputs[heldout], targets[heldout])
    return result


def _cosine(module: StudentMap, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return mean_cosine(module(inputs), targets)
