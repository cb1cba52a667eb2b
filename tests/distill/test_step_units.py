"""Single-process pieces of the step: microbatch masks, row order, loss injection, projections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oprd_mega.bridge import (
    BridgeFile,
    BridgeMetadata,
    BridgeMismatchError,
    ModelIdentity,
    StudentMap,
    save_bridge_file,
)
from oprd_mega.bridge.loaded import check_bridge, check_bridge_against, load_bridge
from oprd_mega.distill.batch import local_rows, make_microbatch, sequence_major
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.distill.projection import (
    BridgeProjection,
    FullProjection,
    ProjectionSpec,
    is_projection_param,
)
from oprd_mega.distill.step import StepOptions
from oprd_mega.distill.taps import InjectLoss, KernelOptions, StudentTaps, TapHead, TapInputs
from oprd_mega.models.hf_config import HFModelArgs


def test_microbatch_masks_select_response_tokens_and_next_token_labels() -> None:
    batch = make_microbatch(3, [[5, 6, 7, 8, 9], [1, 2, 3]], [2, 1], 6, PositionSpec("last_k", 2))
    assert batch.index == 3 and batch.shape == (2, 6)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 0, 0, 0]]
    assert batch.supervised.int().tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    # position p predicts token p + 1; only response tokens are predicted
    assert batch.predicts.int().tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert batch.labels[0, 1:4].tolist() == [7, 8, 9] and batch.labels[1, :2].tolist() == [2, 3]
    with pytest.raises(ValueError, match="sequence 0 has 7 tokens, more than seq_length 6"):
        make_microbatch(0, [[1] * 7], [1], 6, PositionSpec("all"))


def test_rows_are_sequence_major_like_megatron_hidden_states() -> None:
    mask = torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.bool)  # [batch, seq]
    hidden = torch.arange(6.0).view(2, 3).t().unsqueeze(-1)  # [seq, batch, 1]: value = b*3+s
    rows = local_rows(mask, sequence_parallel=False)
    picked = hidden.reshape(-1, 1)[rows].squeeze(1).tolist()
    assert picked == [3.0, 1.0, 5.0]  # (s0,b1), (s1,b0), (s2,b1)
    assert sequence_major(mask).tolist() == [False, True, True, False, False, True]


def test_inject_loss_adds_the_scaled_loss_gradient_to_the_hidden_state() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(4, 2, 3, requires_grad=True)
    target = torch.randn(5, 3)
    rows = torch.tensor([0, 2, 3, 5, 7])
    selected = hidden.reshape(-1, 3)[rows]
    loss = ((selected - target) ** 2).sum()
    out = InjectLoss.apply(hidden, loss, 0.25)
    upstream = torch.randn(4, 2, 3)
    (out * upstream).sum().backward()
    expected = upstream.clone().reshape(-1, 3)
    expected[rows] += 0.25 * 2 * (hidden.detach().reshape(-1, 3)[rows] - target)
    torch.testing.assert_close(hidden.grad, expected.view(4, 2, 3))


class _Layer(torch.nn.Module):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.layer_number = number
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.linear(x), None


class _Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(5), _Layer(6)])  # a later pipeline stage


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = _Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.decoder.layers:
            x = layer(x)[0]
        return x


@pytest.mark.parametrize("normalize", [False, True])
def test_taps_gradient_equals_autograd_of_the_weighted_layer_loss(normalize: bool) -> None:
    torch.manual_seed(1)
    model = _Model()
    x = torch.randn(4, 2, 3)  # [seq, batch, hidden]
    rows = torch.tensor([1, 4, 6])
    targets = {6: torch.randn(3, 3)}
    head = TapHead("t", (2, 6), None, scale=0.5)
    taps = StudentTaps(model, [head], KernelOptions(normalize=normalize))
    assert taps.layers == [6]  # layer 2 lives on another stage
    taps.load({0: {"t": TapInputs(rows=rows, targets=targets, token_weight=1 / 3)}})
    taps.select(0)
    model(x).sum().backward()
    taps.remove()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    out = model(x)
    h = model.decoder.layers[1](model.decoder.layers[0](x)[0])[0].reshape(-1, 3)[rows]
    t = targets[6]
    if normalize:
        h, t = F.normalize(h, dim=-1), F.normalize(t, dim=-1)
    loss = ((h - t) ** 2).sum(-1).div(3).sum() / 3
    (out.sum() + 0.5 * loss).backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    assert taps.stats.loss[("t", 6)].item() == pytest.approx(loss.item(), rel=1e-5)


def test_two_heads_on_one_layer_add_their_scaled_losses_and_skip_unrouted_microbatches() -> None:
    """Two teachers tap layer 6 (one through a projection to width 5), with their own rows,
    token weights and scales; a microbatch routed to one teacher only carries its loss alone."""
    torch.manual_seed(2)
    model = _Model()
    x = torch.randn(4, 2, 3)
    rows_a, rows_b = torch.tensor([1, 4, 6]), torch.tensor([0, 7])
    targets_a, targets_b = {6: torch.randn(3, 3)}, {6: torch.randn(2, 5)}
    projection = FullProjection([6], 3, 5, per_layer=True, sequence_parallel=False, seed=3)
    heads = [TapHead("a", (6,), None, scale=0.5), TapHead("b", (2, 6), projection, scale=2.0)]
    taps = StudentTaps(model, heads, KernelOptions())
    both = {
        "a": TapInputs(rows=rows_a, targets=targets_a, token_weight=1 / 3),
        "b": TapInputs(rows=rows_b, targets=targets_b, token_weight=1 / 2),
    }
    taps.load({0: both, 1: {"b": both["b"]}})

    def reference(routed: tuple[str, ...]):
        out = model(x)
        h = model.decoder.layers[1](model.decoder.layers[0](x)[0])[0].reshape(-1, 3)
        total = out.sum()
        if "a" in routed:
            total = total + 0.5 * ((h[rows_a] - targets_a[6]) ** 2).sum(-1).div(3).sum() / 3
        if "b" in routed:
            w = projection.weight_for(6)
            total = total + 2.0 * ((h[rows_b] @ w.t() - targets_b[6]) ** 2).sum(-1).div(5).sum() / 2
        total.backward()
        return [p.grad.clone() for p in [*model.parameters(), *projection.parameters()]]

    for index, routed in ((0, ("a", "b")), (1, ("b",))):
        taps.select(index)
        model(x).sum().backward()
        taps.select(None)
        got = [p.grad.clone() for p in [*model.parameters(), *projection.parameters()]]
        model.zero_grad()
        projection.zero_grad()
        handles, taps._handles = taps._handles, []
        for handle in handles:
            handle.remove()
        want = reference(routed)
        model.zero_grad()
        projection.zero_grad()
        taps = StudentTaps(model, heads, KernelOptions())
        taps.load({0: both, 1: {"b": both["b"]}})
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_projection_is_seeded_per_layer_and_marked_for_tp_reduction() -> None:
    a = FullProjection([1, 3], 4, 6, per_layer=True, sequence_parallel=True, seed=2)
    b = FullProjection([3], 4, 6, per_layer=True, sequence_parallel=False, seed=2)
    torch.testing.assert_close(a.weight_for(3), b.weight_for(3))  # independent of the stage
    assert a.weight_for(1).shape == (6, 4) and a.weights["layer_1"].sequence_parallel
    shared = FullProjection([1, 3], 4, 6, per_layer=False, sequence_parallel=False)
    assert shared.weight_for(1) is shared.weight_for(3)
    assert is_projection_param("module.oprd_projection.weights.layer_1")
    assert is_projection_param("oprd_projection.weights.shared")
    assert not is_projection_param("decoder.layers.0.mlp.linear_fc1.weight")


def _tiny_args(hidden: int, layers: int) -> HFModelArgs:
    return HFModelArgs(
        family="llama",
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )


def _write_bridge(path: Path, kind: str = "linear") -> Path:
    """A rank-4 bridge for student layer 2 (d_S 8 of 2 layers) -> teacher layer 3 (d_T 12 of 3)."""
    student, teacher = _tiny_args(8, 2), _tiny_args(12, 3)
    torch.manual_seed(0)
    metadata = BridgeMetadata(
        4,
        [(2, 3)],
        ModelIdentity.from_args(student, "s"),
        ModelIdentity.from_args(teacher, "t"),
        student_map=kind,
    )
    maps = {2: StudentMap(8, 4, kind, hidden=5)}  # type: ignore[arg-type]
    bridge = BridgeFile(metadata, maps, {3: (torch.randn(4, 12), torch.randn(12))})
    return save_bridge_file(bridge, path)


def test_bridge_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = _write_bridge(tmp_path / "bridge.safetensors")
    loaded = load_bridge(path)
    assert loaded.rank == 4 and loaded.metadata is not None and loaded.metadata.rank == 4
    assert loaded.student[2].weight().shape == (4, 8) and loaded.teacher[3][0].shape == (4, 12)
    check_bridge(loaded, [(2, 3)], 8, 12, "bridge")
    with pytest.raises(ValueError, match="no P_S for student layer 1"):
        check_bridge(loaded, [(1, 3)], 8, 12, "bridge")
    with pytest.raises(ValueError, match=r"P_S maps \[8\] -> \[4\], expected \[9\] -> \[r\]"):
        check_bridge(loaded, [(2, 3)], 9, 12, "bridge")
    with pytest.raises(FileNotFoundError, match="projection.bridge_path"):
        load_bridge(tmp_path / "missing.safetensors")


def test_bridge_needs_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"student.2.P_S": torch.zeros(4, 8)}, str(bare), metadata={"format": "oprd-bridge"})
    with pytest.raises(ValueError, match="projection.bridge_path: .*not an OPRD bridge"):
        load_bridge(bare)


def test_mlp_bridge_projection_is_the_formula_with_gradients_to_the_rows(tmp_path: Path) -> None:
    bridge = load_bridge(_write_bridge(tmp_path / "mlp.safetensors", "mlp"))
    projection = BridgeProjection(bridge.tensors().student, dtype=torch.float64)
    assert projection.weight_for(2) is None
    tensors = {k: v.double() for k, v in bridge.student[2].tensors().items()}
    rows = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    out, weight = projection.project(2, rows)
    assert weight is None and out.shape == (7, 4)
    # the formula by hand: W_out gelu(W_in h + b), erf GELU
    pre = rows @ tensors["mlp_in"].T + tensors["mlp_in_bias"]
    want = (0.5 * pre * (1 + torch.erf(pre / 2**0.5))) @ tensors["mlp_out"].T
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.square().sum(), rows)
    (want_grad,) = torch.autograd.grad(
        F.mse_loss(want, torch.zeros_like(want), reduction="sum"), rows
    )
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert not [b for b in projection.buffers() if b.requires_grad]
    with pytest.raises(KeyError, match="no P_S for student layer 3"):
        projection.project(3, rows)


def test_bridge_is_checked_against_the_models(tmp_path: Path) -> None:
    path = _write_bridge(tmp_path / "bridge.safetensors")
    student, teacher = _tiny_args(8, 2), _tiny_args(12, 3)
    bridge = check_bridge_against(path, student, teacher, [(2, 3)])
    assert check_bridge_against(bridge, student, teacher, [(2, 3)]) is bridge
    with pytest.raises(BridgeMismatchError, match=r"teacher.num_layers: the bridge has 3"):
        check_bridge_against(bridge, student, _tiny_args(12, 4), [(2, 3)])
    with pytest.raises(BridgeMismatchError, match=r"layer_pairs: \[\(1, 2\)\] are not in"):
        check_bridge_against(bridge, student, teacher, [(1, 2)])


def test_option_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="projection.mode: 'lowrank'"):
        ProjectionSpec("lowrank")
    with pytest.raises(ValueError, match="projection.bridge_path"):
        ProjectionSpec("bridge", normalize=True)
    with pytest.raises(ValueError, match="distillation.normalize"):
        ProjectionSpec("bridge", bridge_path="b.safetensors")
    with pytest.raises(ValueError, match="distillation.method: 'kd'"):
        StepOptions(method="kd")
    with pytest.raises(ValueError, match="distillation.mu"):
        StepOptions(method="combined", mu=0.0)
    assert StepOptions(method="combined", mu=10.0, loss_coef=2.0).oprd_weight == 20.0
    assert StepOptions(method="opd-topk").opd_kind == "topk"
    assert StepOptions(method="oprd").opd_kind is None
