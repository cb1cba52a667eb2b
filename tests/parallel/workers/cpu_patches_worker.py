"""torchrun worker (2 processes): each CPU patch fails before it is applied and works after."""

import faulthandler
import os
import sys

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def expect_fail(fn, what: str) -> None:
    try:
        fn()
    except Exception:
        return
    raise AssertionError(f"{what} worked before its patch was applied")


def all_equal(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], p) for p in parts)


def train_step_pp2(rank: int) -> None:
    """All patches together: a 1F1B training step at PP2 with Megatron's distributed optimizer
    and gradient clipping (schedules, p2p, clip_grads, distributed-optimizer type checks)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from oprd_mega.models import build_gpt_model, parse_hf_config

    tensor_parallel.model_parallel_cuda_manual_seed(11)
    args = parse_hf_config(
        {
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    )
    model = build_gpt_model(args)
    config = model.config
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=0.5),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(2)]

    def forward_step(data_iterator, step_model):
        tokens = next(data_iterator)
        losses = step_model(tokens, None, None, labels=torch.roll(tokens, -1, dims=1))

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm": loss.detach()}

        return losses, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=2,
        seq_length=8,
        micro_batch_size=2,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok and grad_norm is not None and grad_norm > 0, (ok, grad_norm)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed, "optimizer step changed nothing"
    if parallel_state.is_pipeline_last_stage():
        assert len(results) == 2 and all(torch.isfinite(r["lm"]) for r in results)
    print(f"TRAIN-OK rank={rank} grad_norm={grad_norm:.4f}", flush=True)


def main() -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
    from megatron.core.optimizer.clip_grads import (
        clip_grad_by_total_norm_fp32,
        get_grad_norm_fp32,
    )
    from megatron.core.transformer.utils import get_default_causal_mask

    from oprd_mega.parallel import cpu_patches

    assert not torch.cuda.is_available()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert cpu_patches.applied_patches() == []
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    # rng_state: Megatron's CUDA RNG tracker on the CPU generator.
    expect_fail(lambda: tensor_parallel.model_parallel_cuda_manual_seed(7), "rng seeding")
    cpu_patches.apply_cpu_patches(["rng_state"])
    torch.manual_seed(3)  # must not recurse through the patched torch.cuda.manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    default = torch.Generator().manual_seed(7)
    first = torch.rand(4)
    assert torch.equal(first, torch.rand(4, generator=default)), "default stream not seeded 7"
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(7 + 2718 + tp_rank))
    assert torch.equal(forked, expected), "model-parallel RNG stream wrong"
    assert torch.equal(torch.rand(4), torch.rand(4, generator=default)), "fork did not restore"
    assert all_equal(first) and not all_equal(forked), "TP ranks must differ only in the fork"
    print(f"PATCH-OK rng_state rank={rank}", flush=True)

    expect_fail(torch.cuda.current_device, "torch.cuda.current_device")
    cpu_patches.apply_cpu_patches(["current_device"])
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    print(f"PATCH-OK current_device rank={rank}", flush=True)

    expect_fail(torch.cuda.synchronize, "torch.cuda.synchronize")
    cpu_patches.apply_cpu_patches(["synchronize"])
    assert torch.cuda.synchronize() is None
    print(f"PATCH-OK synchronize rank={rank}", flush=True)

    expect_fail(lambda: get_default_causal_mask(5), "device='cuda' causal mask")
    # context-parallel RoPE: this rank's chunks r and 3 - r of 4, indexed from pinned memory
    positions = torch.arange(8.0).view(8, 1)
    world = dist.group.WORLD
    expect_fail(lambda: get_pos_emb_on_this_cp_rank(positions, 0, world), "pin_memory")
    cpu_patches.apply_cpu_patches(["cuda_device_kwargs"])
    mask = get_default_causal_mask(5)
    assert torch.equal(mask, torch.triu(torch.ones(5, 5), diagonal=1).bool())
    chunks = get_pos_emb_on_this_cp_rank(positions, 0, world).view(-1).tolist()
    assert chunks == [2.0 * rank, 2.0 * rank + 1, 6.0 - 2 * rank, 7.0 - 2 * rank], chunks
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.zeros(1, device=torch.device("cuda", 0)).device.type == "cpu"
    print(f"PATCH-OK cuda_device_kwargs rank={rank}", flush=True)

    # cuda_tensor_type: grad clipping asserts grads are torch.cuda.FloatTensor.
    torch.manual_seed(100 + rank)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    world = dist.group.WORLD
    norm = get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=world)
    local_sq = sum(float(g.double().pow(2).sum()) for g in grads)
    total = torch.tensor([local_sq], dtype=torch.float64)
    dist.all_reduce(total)
    assert abs(norm - float(total.sqrt())) < 1e-4 * float(total.sqrt()), (norm, total)
    expect_fail(lambda: clip_grad_by_total_norm_fp32(params, 1.0, norm), "grad type check")
    cpu_patches.apply_cpu_patches(["cuda_tensor_type"])
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    clip_grad_by_total_norm_fp32(params, 1.0, norm)
    coeff = 1.0 / (norm + 1e-6)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g * coeff)
    print(f"PATCH-OK cuda_tensor_type rank={rank}", flush=True)

    assert cpu_patches.applied_patches() == cpu_patches.patch_names()

    # All patches together: pipeline point-to-point between two stages.
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from oprd_mega.parallel import reset_model_parallel

    reset_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    config = ModelParallelConfig(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), config)
    payload = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)
    if parallel_state.is_pipeline_first_stage():
        comm.send_forward(payload, is_last_stage=False)
    else:
        got = comm.recv_forward((3, 2, 4), is_first_stage=False)
        assert torch.equal(got, payload)
    print(f"P2P-OK rank={rank}", flush=True)
    train_step_pp2(rank)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.exit(0)
