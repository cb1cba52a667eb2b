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


def main() -> None:
    from megatron.core import parallel_state, tensor_parallel
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
    cpu_patches.apply_cpu_patches(["cuda_device_kwargs"])
    mask = get_default_causal_mask(5)
    assert torch.equal(mask, torch.triu(torch.ones(5, 5), diagonal=1).bool())
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

    parallel_state.destroy_model_parallel()
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
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.exit(0)
