"""The CPU compatibility layer for megatron-core (megatron_ovr/platform.py), on this CUDA-less machine."""

from __future__ import annotations

import pytest
import torch

from megatron_ovr import platform

pytestmark = pytest.mark.skipif(platform.HAVE_CUDA, reason="the CPU compatibility layer is a no-op with CUDA")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def compat():
    assert platform.enable_cpu_compat() is True
    return True


def test_enable_is_idempotent(compat):
    mode = platform._MODE
    assert platform.cpu_compat_active()
    assert platform.enable_cpu_compat() is True
    assert platform.enable_cpu_compat() is True
    assert platform._MODE is mode  # not a second TorchFunctionMode on the stack
    assert torch.zeros(1, device="cuda").device == CPU


def test_cuda_factories_and_moves_land_on_cpu(compat):
    checks = {
        'zeros(device="cuda")': torch.zeros(2, device="cuda"),
        'zeros(device="cuda:0")': torch.zeros(2, device="cuda:0"),
        'zeros(device=torch.device("cuda"))': torch.zeros(2, device=torch.device("cuda", 0)),
        "empty(device=0)": torch.empty(1, device=0),
        "empty(device=current_device())": torch.empty(1, device=torch.cuda.current_device()),
        "tensor(pin_memory=True)": torch.tensor([1], pin_memory=True),
        "ones(1).cuda()": torch.ones(1).cuda(),
        'ones(1).to("cuda")': torch.ones(1).to("cuda"),
        "ones(1).to(0)": torch.ones(1).to(0),
        "arange(device=cuda)": torch.arange(3, device="cuda"),
    }
    for what, tensor in checks.items():
        assert tensor.device == CPU, what
    assert torch.zeros(2, device="cuda").tolist() == [0.0, 0.0]
    assert torch.tensor([1], pin_memory=True).tolist() == [1]
    x = torch.arange(4.0)
    assert torch.equal(x.cuda(), x) and torch.equal(x.to("cuda", torch.float64), x.double())
    assert x.to("cuda", torch.float64).dtype == torch.float64
    # Other devices and dtype-only moves are untouched.
    assert x.to(torch.float16).dtype == torch.float16
    assert torch.zeros(1, device="meta").device.type == "meta"
    # A bool is not a device index.
    assert platform._is_cuda_device(0) and not platform._is_cuda_device(True)


def test_cuda_runtime_stubs(compat):
    assert torch.cuda.current_device() == CPU
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.query() is True


def test_megatron_rng_tracker_fork_is_isolated(compat):
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    name, seed = "megatron-ovr-test-x", 5
    saved_states, saved_seeds = dict(tracker.states_), set(tracker.seeds_)
    try:
        torch.manual_seed(1000)
        reference = torch.rand(6)  # the default stream without any fork

        torch.manual_seed(1000)
        tracker.add(name, seed)
        with tracker.fork(name):
            inside_first = torch.rand(4)
        with tracker.fork(name):
            inside_second = torch.rand(4)
        outside = torch.rand(6)

        # Adding and forking did not consume or reseed the default stream.
        assert torch.equal(outside, reference)
        # The forked stream is the seed-5 stream, and it continues across forks.
        expected = torch.rand(8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.cat([inside_first, inside_second]), expected)
        # A name is added once (megatron refuses a second add).
        with pytest.raises(Exception, match="already exists"):
            tracker.add(name, seed + 1)
    finally:
        tracker.states_ = saved_states
        tracker.seeds_ = saved_seeds


def test_describe_backends_names_the_path(compat):
    line = platform.describe_backends()
    assert "torch-native" in line
    assert "cpu" in line
    assert platform.default_device() == CPU
    assert platform.distributed_backend() == "gloo"
    assert platform.use_transformer_engine() is False
