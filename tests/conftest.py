"""Shared fixtures. Multi-process tests launch real torchrun jobs (see tests/launch.py); in-process tests
share one single-rank gloo world with megatron's parallel_state set up for TP=PP=CP=1."""

import os
import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank_megatron():
    """A one-process megatron world (gloo on CPU)."""
    from megatron_ovr.config import ParallelConfig
    from megatron_ovr.distributed import init_distributed, shutdown_distributed

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    init_distributed(ParallelConfig())
    yield
    shutdown_distributed()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """The random tiny Qwen2.5-VL as an HF directory, with tokenizer and image-processor files (one per module:
    tests may write next to it)."""
    from tools.make_tiny_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: this machine has no GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
