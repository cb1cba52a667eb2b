"""torchrun worker (4 processes): one distillation step at several layouts vs a float64 oracle.

Usage: step_worker.py WORKDIR PLAN_JSON; rank 0 writes WORKDIR/results.json.
PLAN_JSON: {"cases": [...], "models": {name: {"family", "tied", "config"}}, "dirs": {name:
path}} (models and dirs optional: extra model directories, made here or elsewhere, used by a
case's "student" / "teacher"; a student made by ``oprd-mega prune`` pairs with its source
layers). A layout is [tp, pp, sp], or
[tp, pp, sp, {"student": {"first": a, "last": b}, "teacher": {...}}] with hand-set splits.

The oracle runs the transformers versions of the same student and teacher in float64 and
states METHOD.md's loss directly (no project loss code): per layer the token mean of
||f(W h_s) - f(h_t)||^2 / d over the supervised positions of the global batch, then the mean
over layers; OPD top-1 / top-k on dense logits. One torch AdamW step gives the parameters.
Every rank compares its own Megatron shards with the oracle mapped to that shard, and with the
first layout's (TP1PP1) float32 result, and reports the max differences.
"""

import faulthandler
import functools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STUDENT = {"hidden_size": 32, "head_dim": 8, "num_hidden_layers": 4, "intermediate_size": 64}
TEACHER = {"hidden_size": 48, "head_dim": 12, "num_hidden_layers": 6, "intermediate_size": 96}
COMMON = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 117,  # padded to 128 rows in Megatron: OPD must ignore the padding
    "max_position_embeddings": 64,
}
SEQ, SAMPLES = 16, 4
LR, EPS, WD, BETAS = 1e-3, 1e-6, 0.01, (0.9, 0.95)


def use_layout(tp: int, pp: int, sp: bool, cp: int = 1):
    from oprd_mega.parallel import ParallelLayout, init_distributed, reset_model_parallel

    reset_model_parallel()  # frees the previous layout's process groups (gloo threads)
    return init_distributed(ParallelLayout(tp=tp, pp=pp, sp=sp, cp=cp))


def layout_extras(layout: list) -> dict:
    """A layout's options after ``[tp, pp, sp]``: ``cp``, ``teacher`` ([tp, pp] of its own
    groups), ``split`` (hand-set pipeline splits per model)."""
    return layout[3] if len(layout) > 3 else {}


def own_teacher_groups(layout: list):
    """The teacher's own groups when the layout names one."""
    from oprd_mega.parallel import ParallelLayout
    from oprd_mega.parallel.model_groups import init_model_groups

    teacher = layout_extras(layout).get("teacher")
    if teacher is None:
        return None
    return init_model_groups(ParallelLayout(tp=teacher[0], pp=teacher[1]))


def layout_name(layout: list) -> str:
    """``[tp, pp, sp, {cp: 2}]`` -> ``TP2PP1CP2+SP``; `` split``, ``/teacher-TP1PP1`` added."""
    from oprd_mega.parallel import ParallelLayout

    extras = layout_extras(layout)
    name = str(ParallelLayout(*layout[:3], cp=extras.get("cp", 1)))
    if "split" in extras:
        name += " split"  # set by hand per model
    if "teacher" in extras:
        name += f"/teacher-TP{extras['teacher'][0]}PP{extras['teacher'][1]}"
    return name


def samples() -> list[tuple[list[int], int]]:
    """(prompt + response ids, prompt length); some responses shorter than k."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(5, 11), (3, 4), (7, 9), (2, 14)]
    out = []
    for prompt, response in shapes[:SAMPLES]:
        ids = torch.randint(1, COMMON["vocab_size"], (prompt + response,), generator=generator)
        out.append((ids.tolist(), prompt))
    return out


# ----------------------------------------------------------------------------- oracle (float64)
def phi(layer: int, n_student: int, n_teacher: int) -> int:
    return int((layer - 1) * (n_teacher - 1) / (n_student - 1) + 0.5) + 1


def paired(work: Path, case: dict, layer: int, n_student: int, n_teacher: int) -> int:
    """The teacher layer of a student layer: the source layer recorded by ``oprd-mega prune``
    in the student's config.json (read here directly) when the teacher is that deep, else phi."""
    config = json.loads((work / case.get("student", "student") / "config.json").read_text())
    record = config.get("oprd_layer_map")
    if record is not None and record["source_num_layers"] == n_teacher:
        return record["source_layers"][layer - 1]
    return phi(layer, n_student, n_teacher)


def projection_init(case: dict, layer: int, d_s: int, d_t: int) -> torch.Tensor:
    """The documented seeded init of a ``full`` map (d_T x d_S, std 1/sqrt(d_S))."""
    key = layer if case["per_layer"] else 0
    generator = torch.Generator().manual_seed(case.get("seed", 0) * 100003 + key)
    return torch.randn(d_t, d_s, generator=generator) * d_s**-0.5


def teacher_specs(case: dict) -> list[dict]:
    """The case's teachers: ``case["teachers"]`` (several, routed per sample by
    ``case["routes"]``), else the one teacher of the case's own keys."""
    if "teachers" in case:
        return case["teachers"]
    return [
        {
            "name": "teacher",
            "model": case.get("teacher", "teacher"),
            "layers": case["layers"],
            "projection": case["projection"],
            "weight": 1.0,
        }
    ]


def routed_rows(case: dict, name: str) -> torch.Tensor:
    """Which samples teacher ``name`` supervises (every sample without routes)."""
    routes = case.get("routes")
    if routes is None:
        return torch.ones(SAMPLES, dtype=torch.bool)
    return torch.tensor([name in route for route in routes])


def oracle(case: dict, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    def load(name):
        model = AutoModelForCausalLM.from_pretrained(
            str(work / name), dtype=torch.float64, attn_implementation="eager"
        )
        # transformers builds the embedding with padding_idx=pad_token_id, whose row never
        # gets a gradient; the loss has no such rule (SmolLM2's pad token is its EOS, a real
        # token of every response), and Megatron's embedding updates every row
        model.model.embed_tokens.padding_idx = None
        return model

    student = load(case.get("student", "student"))
    teachers = {spec["name"]: load(spec["model"]).eval() for spec in teacher_specs(case)}
    data = samples()
    tokens = torch.zeros(SAMPLES, SEQ, dtype=torch.long)
    supervised = torch.zeros(SAMPLES, SEQ, dtype=torch.bool)
    response = torch.zeros(SAMPLES, SEQ, dtype=torch.bool)
    k = case["last_k"]
    for row, (ids, prompt) in enumerate(data):
        tokens[row, : len(ids)] = torch.tensor(ids)
        response[row, prompt : len(ids)] = True
        start = max(prompt, len(ids) - k)
        supervised[row, start : len(ids)] = True

    def run(model, grad: bool):
        captured = {}
        handles = [
            layer.register_forward_hook(
                lambda _m, _i, out, n=n: captured.__setitem__(
                    n, out[0] if isinstance(out, tuple) else out
                )
            )
            for n, layer in enumerate(model.model.layers, start=1)
        ]
        with torch.set_grad_enabled(grad):
            logits = model(tokens).logits
        for handle in handles:
            handle.remove()
        return captured, logits

    s_hidden, s_logits = run(student, True)
    n_s, d_s = student.config.num_hidden_layers, student.config.hidden_size
    maps = {}
    total = torch.zeros((), dtype=torch.float64)
    layer_loss, teacher_loss = {}, {}
    oprd_total = torch.zeros((), dtype=torch.float64)
    opd_total = torch.zeros((), dtype=torch.float64)
    several = "teachers" in case
    teacher_hidden = {}
    for spec in teacher_specs(case):
        teacher = teachers[spec["name"]]
        t_hidden, t_logits = run(teacher, False)
        if not several:
            teacher_hidden = t_hidden
        n_t, d_t = teacher.config.num_hidden_layers, teacher.config.hidden_size
        rows = routed_rows(case, spec["name"])
        mask = supervised & rows[:, None]
        oprd = torch.zeros((), dtype=torch.float64)
        own_layers = {}
        if case["method"] in ("oprd", "combined"):
            count = mask.sum()
            for layer in spec["layers"]:
                t_layer = paired(work, case, layer, n_s, n_t)
                if spec["projection"] == "bridge":
                    p_s, p_t, mu_t = case["_bridge"][layer]
                    p_t, mu_t = p_t.double(), mu_t.double()
                    if isinstance(p_s, tuple):  # MLP: W_out gelu(W_in h + b), erf GELU
                        w_in, b_in, w_out = (t.double() for t in p_s)
                        pre = s_hidden[layer][mask] @ w_in.T + b_in
                        hs = (0.5 * pre * (1 + torch.erf(pre / 2**0.5))) @ w_out.T
                    else:
                        hs = s_hidden[layer][mask] @ p_s.double().T
                    ht = (t_hidden[t_layer][mask] - mu_t) @ p_t.T
                elif spec["projection"] == "identity":
                    hs = s_hidden[layer][mask]
                    ht = t_hidden[t_layer][mask]
                else:
                    key = layer if case["per_layer"] else 0
                    key = f"{spec['name']}.{key}" if several else key
                    if key not in maps:
                        maps[key] = projection_init(case, layer, d_s, d_t).double().requires_grad_()
                    hs = s_hidden[layer][mask] @ maps[key].T
                    ht = t_hidden[t_layer][mask]
                if case["normalize"]:
                    hs, ht = F.normalize(hs, dim=-1), F.normalize(ht, dim=-1)
                per_token = ((hs - ht) ** 2).sum(-1) / ht.shape[-1]
                own_layers[layer] = per_token.sum() / count
            oprd = sum(own_layers.values()) / len(own_layers)
        weight = case.get("mu", 1.0) if case["method"] == "combined" else 1.0
        part = weight * oprd if case["method"] in ("oprd", "combined") else 0.0 * oprd
        opd = torch.zeros((), dtype=torch.float64)
        if case["method"] != "oprd":
            kind = case["opd"]
            routed_response = response & rows[:, None]
            predicts = torch.zeros_like(response)
            predicts[:, :-1] = routed_response[:, 1:]
            labels = tokens[:, 1:][routed_response[:, 1:]]
            s_log = s_logits[predicts].log_softmax(-1)
            t_log = t_logits[predicts].log_softmax(-1)
            if kind == "top1":
                lp = s_log.gather(1, labels[:, None])[:, 0]
                lq = t_log.gather(1, labels[:, None])[:, 0]
                per_token = (lp - lq).detach() * lp
            else:
                chosen = s_logits[predicts].detach().topk(case["top_k"], dim=-1).indices
                p = s_logits[predicts].gather(1, chosen).log_softmax(-1)
                q = t_logits[predicts].gather(1, chosen).log_softmax(-1)
                per_token = (p.exp() * (p - q)).sum(-1)
            opd = per_token.mean()
            part = part + opd
        lam = spec.get("weight", 1.0)
        total = total + lam * part
        oprd_total = oprd_total + lam * oprd
        opd_total = opd_total + lam * opd
        teacher_loss[spec["name"]] = float(part)
        if not several:
            layer_loss = own_layers
    oprd, opd = oprd_total, opd_total
    params = dict(student.named_parameters())
    for key, value in maps.items():
        params[f"proj.{key}"] = value
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    grads = {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    for name, param in params.items():
        param.grad = grads[name]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    optimizer.step()
    return {
        "loss": float(total),
        "oprd": float(oprd),
        "opd": float(opd),
        "layer_loss": {int(k): float(v) for k, v in layer_loss.items()},
        "teacher_loss": teacher_loss,
        "grads": {n: g.detach().clone() for n, g in grads.items()},
        "params": {n: p.detach().clone() for n, p in params.items()},
        "teacher_hidden": {n: h.detach() for n, h in teacher_hidden.items()},
        "student_logits0": s_logits[0, : len(data[0][0])].detach(),
    }


# ----------------------------------------------------------------------------- Megatron side
def make_bridge(work: Path, case: dict) -> None:
    from oprd_mega.bridge import (
        BridgeFile,
        BridgeMetadata,
        ModelIdentity,
        StudentMap,
        save_bridge_file,
    )

    generator = torch.Generator().manual_seed(11)
    r, d_s, d_t = 4, STUDENT["hidden_size"], TEACHER["hidden_size"]
    n_s, n_t = STUDENT["num_hidden_layers"], TEACHER["num_hidden_layers"]
    student, teacher, tensors = {}, {}, {}
    for layer in case["layers"]:
        t_layer = phi(layer, n_s, n_t)
        q, _ = torch.linalg.qr(torch.randn(d_t, r, generator=generator, dtype=torch.float64))
        p_t, mu_t = q.T.float().contiguous(), 0.1 * torch.randn(d_t, generator=generator)
        if case.get("student_map") == "mlp":
            hidden = 6
            p_s = (
                torch.randn(hidden, d_s, generator=generator) / d_s**0.5,
                0.5 * torch.randn(hidden, generator=generator),
                torch.randn(r, hidden, generator=generator) / hidden**0.5,
            )
            named = dict(zip(("mlp_in", "mlp_in_bias", "mlp_out"), p_s, strict=True))
        else:
            p_s = torch.randn(r, d_s, generator=generator) / d_s**0.5
            named = {"P_S": p_s}
        student[layer] = StudentMap.from_tensors(named, f"student.{layer}")
        teacher[t_layer] = (p_t, mu_t)
        tensors[layer] = (p_s, p_t, mu_t)
    case["_bridge"] = tensors
    if dist.get_rank() == 0:
        vocab = COMMON["vocab_size"]
        metadata = BridgeMetadata(
            r,
            [(layer, phi(layer, n_s, n_t)) for layer in case["layers"]],
            ModelIdentity("student", d_s, n_s, vocab),
            ModelIdentity("teacher", d_t, n_t, vocab),
            student_map=case.get("student_map", "linear"),
        )
        save_bridge_file(BridgeFile(metadata, student, teacher), work / "bridge.safetensors")
    dist.barrier()


def local_expected(args, model, hf: dict, prefix: str = "") -> dict:
    """The oracle's tensors mapped to this rank's Megatron shards (global names)."""
    from megatron.core import parallel_state

    from oprd_mega.convert.mapping import hf_to_mcore_state
    from oprd_mega.convert.mcore_io import global_parameters

    names = global_parameters(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")})
    out = {}
    for layer in [None, *layers]:
        state = hf_to_mcore_state(
            args, lambda n: hf[prefix + n], layer, tp_rank=tp_rank, tp_size=tp_size
        )
        out.update({n: t for n, t in state.items() if n in names})
    return out


def max_diff(got: dict, want: dict) -> tuple[float, float]:
    worst_abs, scale = 0.0, 1e-30
    for name, tensor in want.items():
        diff = (got[name].double() - tensor.double()).abs().max().item()
        if os.environ.get("STEP_DEBUG") and diff > 1e-6:
            print("DIFF", name, diff, flush=True)
        worst_abs = max(worst_abs, diff)
        scale = max(scale, tensor.abs().max().item())
    return worst_abs, scale


def all_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def run_layout(case: dict, layout: list, work: Path, ref: dict, base: dict | None) -> dict:
    from megatron.core import parallel_state

    from oprd_mega.bridge.loaded import load_bridge
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import global_parameters, load_hf_weights
    from oprd_mega.distill.batch import make_microbatch, make_packed_microbatch
    from oprd_mega.distill.build import TeacherSetup, build_step, build_teacher
    from oprd_mega.distill.layers import layer_pairs, source_layers
    from oprd_mega.distill.options import OptimizerOptions
    from oprd_mega.distill.positions import PositionSpec
    from oprd_mega.distill.projection import ProjectionSpec, is_projection_param, projection_of
    from oprd_mega.distill.step import StepOptions
    from oprd_mega.distill.taps import KernelOptions
    from oprd_mega.models import build_gpt_model, load_hf_config
    from oprd_mega.models.recompute import RecomputeOptions
    from oprd_mega.models.running import unwrap
    from oprd_mega.models.shapes import PipelineSplit, sequence_multiple
    from oprd_mega.rollout.megatron_sync import _megatron_logits
    from tests.torchrun_utils import stage_layers

    tp, pp, sp = layout[:3]
    cp = layout_extras(layout).get("cp", 1)
    use_layout(tp, pp, sp, cp)
    teacher_groups = own_teacher_groups(layout)
    hand_set = layout_extras(layout).get("split", {})
    splits = {k: PipelineSplit(**v) for k, v in hand_set.items()}
    s_args = replace(
        load_hf_config(work / case.get("student", "student")), pipeline_split=splits.get("student")
    )
    recompute = RecomputeOptions(**case.get("recompute", {}))
    student = build_gpt_model(s_args, sequence_parallel=sp, recompute=recompute)
    load_hf_weights(student, s_args, HFCheckpointReader(work / case.get("student", "student")))
    options = StepOptions(
        method=case["method"],
        opd=f"opd-{case.get('opd', 'top1')}",
        top_k=case.get("top_k", 16),
        mu=case.get("mu", 1.0),
        kernel=KernelOptions(normalize=case["normalize"]),
        target_dtype=torch.float32,
        opd_chunk_tokens=5,
        overlap_teacher=case.get("overlap_teacher", False),
    )
    several = "teachers" in case
    setups, groups_seen = [], None
    for one in teacher_specs(case):
        # the layout's own teacher groups go to the one teacher, or to the teacher marked "own"
        own = teacher_groups if (not several or one.get("own")) else None
        t_args = replace(load_hf_config(work / one["model"]), pipeline_split=splits.get("teacher"))
        pairs = layer_pairs(
            one["layers"], s_args.num_layers, t_args.num_layers, source_layers(s_args, t_args)
        )
        teacher = build_teacher(
            t_args, pairs, options, sequence_parallel=sp and own is None, pg_collection=own
        )
        load_hf_weights(teacher, t_args, HFCheckpointReader(work / one["model"]))
        bridge_path = str(work / "bridge.safetensors") if one["projection"] == "bridge" else None
        spec = ProjectionSpec(one["projection"], case["per_layer"], case["normalize"], bridge_path)
        setups.append(
            TeacherSetup(
                one["name"],
                teacher,
                pairs,
                projection=spec,
                bridge=load_bridge(bridge_path).tensors() if bridge_path else None,
                own_layout=own is not None,
                weight=one.get("weight", 1.0),
            )
        )
        if groups_seen is None or own is not None:
            groups_seen = teacher  # the teacher whose groups the layout's name describes
    teacher = setups[0].model
    distributed = case.get("distributed_optimizer", False)
    optimizer_options = OptimizerOptions(
        lr=LR, weight_decay=WD, betas=BETAS, eps=EPS, use_distributed_optimizer=distributed
    )
    step = build_step(
        student,
        setups,
        options,
        optimizer_options,
        overlap_grad_reduce=case.get("overlap_grad_reduce", False),
        overlap_param_gather=case.get("overlap_param_gather", False),
    )
    model, optimizer = step.student, step.optimizer
    attention_runs = [0]
    for layer in unwrap(model).decoder.layers:
        layer.self_attention.core_attention.register_forward_hook(
            lambda *_: attention_runs.__setitem__(0, attention_runs[0] + 1)
        )
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    data = samples()
    per_rank = SAMPLES // dp
    mine_samples = data[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    packed = case.get("packed", False)
    # packed: a rank's samples two to a row (THD), so that sequences really share rows
    mbs = 2 if dp == 1 or (packed and per_rank > 1) else 1
    spec_positions = PositionSpec("last_k", case["last_k"])
    # packed under CP: every sequence's slot a multiple of 2 x cp, as the trainer pads it
    make = (
        functools.partial(make_packed_microbatch, slot_multiple=sequence_multiple(cp=cp))
        if packed
        else make_microbatch
    )
    microbatches = [
        make(
            i,
            [s for s, _ in mine_samples[j : j + mbs]],
            [p for _, p in mine_samples[j : j + mbs]],
            SEQ * mbs if packed else SEQ,
            spec_positions,
        )
        for i, j in enumerate(range(0, per_rank, mbs))
    ]
    if "routes" in case:  # every microbatch's samples share one route
        first_sample = dp_rank * per_rank
        routes = [
            {tuple(case["routes"][first_sample + j + m]) for m in range(mbs)}
            for j in range(0, per_rank, mbs)
        ]
        assert all(len(route) == 1 for route in routes), routes
        microbatches = [
            replace(batch, teachers=next(iter(route)))
            for batch, route in zip(microbatches, routes, strict=True)
        ]
    if several:
        inner_teacher = unwrap(groups_seen)
        teacher_checks = {
            "teacher_groups": [
                inner_teacher.pg_collection.tp.size(),
                inner_teacher.pg_collection.pp.size(),
            ]
        }
    else:
        teacher_checks = check_teacher(step, teacher, microbatches, ref, mine_samples, sp, mbs)
    # the weight-sync probe's own forward (full-sequence logits) before the update
    probe = _megatron_logits(model, samples()[0][0])
    probe_abs = 0.0 if probe is None else float((probe - ref["student_logits0"]).abs().max())
    head_calls = [0]
    output_layer = getattr(unwrap(model), "output_layer", None)
    if output_layer is not None:
        output_layer.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
    overlap = (
        overlap_probe(step, microbatches, optimizer_options)
        if case.get("overlap_grad_reduce")
        else {}
    )
    attention_runs[0] = 0
    # which model's first layer ran, in order, during the step: s (student), t (the first
    # teacher), u (the second)
    order: list[str] = []
    tagged = [
        ("s", model),
        *((tag, t.spec.model) for tag, t in zip("tu", step.teachers[:2], strict=False)),
    ]
    order_hooks = [
        unwrap(chunk).decoder.layers[0].register_forward_hook(lambda *_, tag=tag: order.append(tag))
        for tag, chunk in tagged
        if pp == 1
    ]
    result = step.run(microbatches)
    for handle in order_hooks:
        handle.remove()
    if distributed:
        gather_grad_shards(model)
    inner = unwrap(model)
    per_layer = attention_runs[0] / (len(microbatches) * len(inner.decoder.layers))
    grads = {n: p.main_grad for n, p in global_parameters(inner).items()}
    params = {n: p.detach() for n, p in global_parameters(inner).items()}
    backbone = {n: g for n, g in grads.items() if not is_projection_param(n)}
    out = {
        **teacher_checks,
        "student_head_calls": int(all_max(head_calls[0])),
        "call_order": "".join(order),
        "probe_logits_abs": all_max(probe_abs),
        "loss": result.loss,
        "oprd": result.oprd_loss,
        "opd": result.opd.get("pg_loss", 0.0),
        "layer_loss": {str(k): v for k, v in result.layer_loss.items()},
        "teacher_loss": {name: part.loss for name, part in result.teachers.items()},
        "teacher_supervised": {
            name: part.supervised_tokens for name, part in result.teachers.items()
        },
        "teacher_microbatches": {name: part.microbatches for name, part in result.teachers.items()},
        "supervised": result.supervised_tokens,
        "cosine": result.cosine,
        "attention_runs_per_layer": all_max(per_layer),
        **{key: int(all_max(count)) for key, count in overlap.items() if key != "finalizing"},
    }
    want_grads = local_expected(s_args, inner, ref["grads"])
    want_params = local_expected(s_args, inner, ref["params"])
    # every trainable ``full`` map: (its key here, the parameter, the oracle's key)
    maps = []
    for one in teacher_specs(case):
        projection = projection_of(inner, one["name"] if several else None)
        if projection is None or one["projection"] != "full":
            continue
        for key, param in projection.weights.items():
            ref_key = key.split("_")[1] if case["per_layer"] else "0"
            ref_key = f"proj.{one['name']}.{ref_key}" if several else f"proj.{ref_key}"
            maps.append((f"{one['name']}/{key}" if several else key, param, ref_key))
    proj_grads = {key: (param.main_grad, ref["grads"][want]) for key, param, want in maps}
    proj_params = {key: (param.detach(), ref["params"][want]) for key, param, want in maps}
    g_abs, g_scale = max_diff(backbone, want_grads)
    p_abs, _ = max_diff(params, want_params)
    pg_abs = max((float((a - b).abs().max()) for a, b in proj_grads.values()), default=0.0)
    pp_abs = max((float((a - b).abs().max()) for a, b in proj_params.values()), default=0.0)
    out["ref_grad_abs"] = all_max(g_abs)
    out["ref_grad_scale"] = all_max(g_scale)
    out["ref_param_abs"] = all_max(p_abs)
    out["ref_proj_grad_abs"] = all_max(pg_abs)
    out["ref_proj_param_abs"] = all_max(pp_abs)
    out["checked_tensors"] = int(all_max(len(want_grads) + len(proj_grads)))
    if base is not None:  # the first layout's float32 result, mapped to this rank's shards
        out["base_grad_abs"] = all_max(
            max_diff(backbone, local_expected(s_args, inner, base, "g."))[0]
        )
        out["base_param_abs"] = all_max(
            max_diff(params, local_expected(s_args, inner, base, "p."))[0]
        )
        pb = [float((param.main_grad - base["proj." + key]).abs().max()) for key, param, _ in maps]
        out["base_proj_grad_abs"] = all_max(max(pb, default=0.0))
    if pp > 2:  # the layers each stage built, as Megatron placed them
        out["stage_layers"] = {"student": stage_layers(inner), "teacher": stage_layers(teacher)}
    if any(one["projection"] == "full" for one in teacher_specs(case)):  # on every stage
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        out["projection_in_optimizer"] = int(
            -all_max(-float(all(id(p) in in_optimizer for _, p, _ in maps)))
        )
        if pp > 1:
            out["checkpoint_restores_projection"] = checkpoint_round_trip(
                inner,
                s_args,
                {key: param for key, param, _ in maps},
                work
                / (
                    f"ckpt-{case['name']}-tp{tp}-pp{pp}-cp{cp}"
                    + ("-split" if hand_set else "")
                    + ("-own" if teacher_groups is not None else "")
                ),
                work / case.get("student", "student"),
            )
    out["_export"] = (grads, params, proj_grads, s_args) if tp == 1 and pp == 1 else None
    return out


def gather_grad_shards(model) -> None:
    """Distributed optimizer: each data-parallel rank holds the reduced sum of its own shard of
    every gradient bucket; gather the shards so every ``main_grad`` is the full reduced one."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for buffer in model.buffers:
        for bucket in buffer.buckets:
            flat = bucket.grad_data.view(-1)
            shard = flat.numel() // size
            mine = flat[rank * shard : (rank + 1) * shard].clone()
            dist.all_gather_into_tensor(flat, mine, group=group)


def overlap_probe(step, microbatches, optimizer_options) -> dict:
    """With overlap_grad_reduce Megatron dispatches a bucket early only from the second step
    on: run one step, restore the parameters and a fresh optimizer, and count the reductions
    the measured step then dispatches during backward (before the grads are finalised)."""
    from oprd_mega.distill.step import build_optimizer
    from oprd_mega.models.running import unwrap

    model = step.student
    saved = [p.detach().clone() for p in model.parameters()]
    step.run(microbatches)
    with torch.no_grad():
        for param, value in zip(model.parameters(), saved, strict=True):
            param.copy_(value)
    step.optimizer = build_optimizer(model, optimizer_options)
    phase = {"finalizing": False, "early": 0, "late": 0}
    for group in model.bucket_groups:
        start = group.start_grad_sync

        def counted(*args, _start=start, **kwargs):
            phase["late" if phase["finalizing"] else "early"] += 1
            return _start(*args, **kwargs)

        group.start_grad_sync = counted
    config = unwrap(model).config
    finalize = config.finalize_model_grads_func

    def marked(*args, **kwargs):
        phase["finalizing"] = True
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = marked
    return phase


def checkpoint_round_trip(inner, args, maps: dict, directory: Path, hf_dir: Path) -> int:
    """Save the student (projections included) as torch_dist, clobber, load: same tensors?"""
    from oprd_mega.convert.mcore_io import load_mcore_checkpoint, save_mcore_checkpoint

    saved = {k: p.detach().clone() for k, p in maps.items()}
    save_mcore_checkpoint(inner, args, directory, hf_source=hf_dir)
    with torch.no_grad():
        for param in maps.values():
            param.fill_(7.0)
    load_mcore_checkpoint(inner, directory)
    same = all(torch.equal(saved[k], p.detach()) for k, p in maps.items())
    return int(-all_max(-float(same)))


def check_teacher(step, teacher, microbatches, ref, mine_samples, sp: bool, mbs: int) -> dict:
    """Truncated teacher: no head; targets = the oracle's states at this rank's supervised rows.

    ``mbs`` samples per microbatch (rows when padded, sequences in the one row when packed).
    """
    import dataclasses

    from megatron.core import parallel_state

    from oprd_mega.distill.batch import context_shard, local_rows
    from oprd_mega.distill.teacher import teacher_pass
    from oprd_mega.distill.teacher_layout import teacher_pass_own_layout
    from oprd_mega.models.running import unwrap
    from oprd_mega.parallel.context import context_positions

    inner = unwrap(teacher)
    out = {
        "teacher_has_output_layer": int(all_max(getattr(inner, "output_layer", None) is not None)),
        "teacher_has_final_norm": int(
            all_max(getattr(inner.decoder, "final_layernorm", None) is not None)
        ),
        # the groups the teacher computes in (its own with parallel.teacher)
        "teacher_groups": [inner.pg_collection.tp.size(), inner.pg_collection.pp.size()],
    }
    only = step.teachers[0]  # the one teacher of these cases
    if not only.plan.pairs:
        return out
    worst, rows_bad, dtypes = 0.0, 0, set()
    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    shards = [context_shard(batch) for batch in microbatches]  # what the step feeds the teacher
    for dtype in (torch.float32, torch.bfloat16):
        plan = dataclasses.replace(only.plan, target_dtype=dtype)
        if only.spec.placement is None:
            targets = teacher_pass(teacher, shards, plan).targets
        else:  # the teacher's own groups (no CP there), targets routed to the student's ranks
            targets = teacher_pass_own_layout(
                teacher, microbatches, plan, only.spec.placement
            ).targets
        stage = parallel_state.get_pipeline_model_parallel_rank()
        for batch in microbatches:
            first = batch.index * mbs
            for student_layer, teacher_layer in only.plan.pairs:
                if only.plan.student_stage[student_layer] != stage:
                    continue
                got = targets[batch.index][student_layer]
                dtypes.add(str(got.dtype))
                full = ref["teacher_hidden"][teacher_layer]  # [samples, seq, d] float64
                dp_rank = parallel_state.get_data_parallel_rank()
                offset = dp_rank * len(mine_samples) + first
                hidden = full[offset : offset + mbs].transpose(0, 1)  # [seq, b, d]
                if batch.cu_seqlens is not None:  # the same states, back to back in one row
                    cu = batch.cu_seqlens.tolist()
                    parts = [full[offset + j, : cu[j + 1] - cu[j]] for j in range(mbs)]
                    tail = batch.shape[1] - cu[mbs]
                    parts.append(full.new_zeros(tail, full.shape[-1]))
                    hidden = torch.cat(parts).unsqueeze(1)  # [seq, 1, d]
                if cp > 1:  # this rank's load-balanced chunks of every sequence
                    bounds = (
                        [0, hidden.shape[0]]
                        if batch.cu_seqlens is None
                        else batch.cu_seqlens.tolist()
                    )
                    hidden = hidden.index_select(0, context_positions(bounds, cp, cp_rank))
                if sp:
                    tp = parallel_state.get_tensor_model_parallel_world_size()
                    shard = hidden.shape[0] // tp
                    rank = parallel_state.get_tensor_model_parallel_rank()
                    hidden = hidden[rank * shard : (rank + 1) * shard]
                rows = local_rows(shards[batch.index].supervised, sp)
                want = hidden.reshape(-1, hidden.shape[-1])[rows]
                if only.plan.bridge is not None:  # the teacher ships P_T (h - mu_T)
                    p_t, mu_t = only.plan.bridge[teacher_layer]
                    want = (want - mu_t.double()) @ p_t.double().T
                if want.shape != got.shape:
                    rows_bad += 1
                    continue
                error = (got.double() - want).abs()
                if dtype == torch.bfloat16:  # beyond bf16 rounding of the float32 state
                    error = (error - 2**-8 * want.abs()).clamp(min=0)
                diff = error.max().item() if want.numel() else 0.0
                worst = max(worst, diff)
    out["teacher_target_abs"] = all_max(worst)
    out["teacher_rows_bad"] = int(all_max(rows_bad))
    out["teacher_target_dtypes"] = sorted(dtypes)
    return out


def export_base(out: dict) -> dict:
    """TP1PP1 float32 grads/params in HF names (every rank holds the full model)."""
    from oprd_mega.convert.mapping import mcore_to_hf_state

    grads, params, proj_grads, args = out["_export"]
    base = {}
    for prefix, tensors in (("g.", grads), ("p.", params)):
        for layer in [None, *range(args.num_layers)]:
            sub = {n: t.detach().clone() for n, t in tensors.items() if not n.startswith("oprd_")}
            base.update({prefix + n: t for n, t in mcore_to_hf_state(args, sub, layer).items()})
    for key, (grad, _) in proj_grads.items():
        base["proj." + key] = grad.detach().clone()
    return base


def main() -> None:
    import time

    start = time.perf_counter()
    work, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
    use_layout(1, 1, False)
    timing = {"startup": time.perf_counter() - start}
    rank = dist.get_rank()
    if rank == 0:
        from tools.tiny_hf_models import make_tiny_model

        make_tiny_model("llama", work / "student", seed=1, **COMMON, **STUDENT)
        make_tiny_model("llama", work / "teacher", seed=2, **COMMON, **TEACHER)
        same_width = {**TEACHER, "hidden_size": 32, "head_dim": 8}
        make_tiny_model("llama", work / "teacher32", seed=3, **COMMON, **same_width)
        for name, path in plan.get("dirs", {}).items():  # model directories made elsewhere
            (work / name).symlink_to(path, target_is_directory=True)
        for seed, (name, spec) in enumerate(plan.get("models", {}).items(), start=4):
            make_tiny_model(
                spec["family"], work / name, tied=spec["tied"], seed=seed, **spec["config"]
            )
    dist.barrier()
    results = {}
    for case in plan["cases"]:
        if case["projection"] == "bridge":
            make_bridge(work, case)
        clock = time.perf_counter()
        ref = oracle(case, work)
        timing[f"{case['name']} oracle"] = time.perf_counter() - clock
        out = {
            "ref": {k: ref[k] for k in ("loss", "oprd", "opd", "layer_loss", "teacher_loss")},
            "layouts": {},
        }
        base = None
        for layout in case["layouts"]:
            clock = time.perf_counter()
            got = run_layout(case, layout, work, ref, base)
            got["seconds"] = time.perf_counter() - clock
            export = got.pop("_export")
            if base is None and export is not None:
                got["_export"] = export
                base = export_base(got)
                got.pop("_export")
            out["layouts"][layout_name(layout)] = got
        results[case["name"]] = out
    results["_timing"] = timing
    if rank == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))
    from oprd_mega.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
