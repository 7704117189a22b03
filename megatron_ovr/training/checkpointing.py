"""Atomic megatron dist_checkpointing checkpoints: model, optimizer, scheduler, RNG, and the caller's
state (step, data position, config).

Layout: ``ROOT/iter_NNNNNNN/`` (a dist_checkpointing directory) and ``ROOT/latest`` (the newest complete
iteration). A save writes ``iter_NNNNNNN.partial`` and renames it only after every rank has finished; the
``latest`` pointer is then replaced atomically. A crash or ``kill -9`` during a save leaves the previous
checkpoint and pointer untouched, and the next save clears the stale partial directory.

Model weights reshard on load to any TP/PP/DP layout; optimizer state to another DP size (same TP/PP).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

# "dp_reshardable": distributed-optimizer state reshards over data-parallel sizes. megatron-core 0.16's
# "fully_reshardable" load fails on the torch-Adam path (no TE/apex: its per-parameter "step" state has no
# saved counterpart), so optimizer state keeps its TP/PP layout; model weights reshard freely.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
LATEST = "latest"


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path) -> Optional[int]:
    """The newest complete iteration under ``root``, or None when there is none."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    step = int(pointer.read_text().strip())
    if not iteration_dir(root, step).is_dir():
        raise FileNotFoundError(f"{pointer} names iteration {step}, but {iteration_dir(root, step)} is missing")
    return step


def saved_extra(root: str | Path) -> dict[str, Any]:
    """The caller's state saved with the latest iteration (step, config, ``model_config``, ...), read from
    the common state only (no tensors)."""
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root} holds no checkpoint (no '{LATEST}' pointer)")
    return dist_checkpointing.load_common_state_dict(str(iteration_dir(root, step)))["extra"]


def saved_model_config(root: str | Path):
    """The Qwen2.5-VL config a checkpoint was saved with (the HF ``config.json`` layout is stored)."""
    from megatron_ovr.config import Qwen25VLConfig

    extra = saved_extra(root)
    if "model_config" not in extra:
        raise KeyError(f"checkpoint {root} does not record its model config ('model_config')")
    return Qwen25VLConfig.from_hf_config(extra["model_config"])


def _unwrap(model) -> list[torch.nn.Module]:
    return [getattr(m, "module", m) for m in model]


def _model_key(i: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{i}"


def _model_state(chunks: Sequence[torch.nn.Module], skip: Sequence[str] = ()) -> dict[str, Any]:
    return {
        _model_key(i, len(chunks)): {k: v for k, v in chunk.sharded_state_dict().items() if k not in skip}
        for i, chunk in enumerate(chunks)
    }


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(state: Optional[dict]) -> ShardedObject:
    """One RNG state per global rank (each rank draws its own streams)."""
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _sharded_state(model, optimizer, is_loading: bool, skip_model_keys: Sequence[str] = ()) -> dict[str, Any]:
    state = _model_state(_unwrap(model), skip_model_keys)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return state


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, extra: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory."""
    final = iteration_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier save
        partial.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["rng"] = _rng_object(_rng_state())
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["extra"] = extra
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        pointer_tmp = Path(root) / (LATEST + ".tmp")
        pointer_tmp.write_text(f"{step}\n")
        with open(pointer_tmp) as f:
            os.fsync(f.fileno())
        os.replace(pointer_tmp, Path(root) / LATEST)
    dist.barrier()
    return final


def load_checkpoint(
    root: str | Path,
    model,
    optimizer=None,
    scheduler=None,
    *,
    restore_rng: bool = True,
    step: Optional[int] = None,
    skip_model_keys: Sequence[str] = (),
):
    """Loads iteration ``step`` (default: the latest) under ``root`` into the given objects (optimizer and
    scheduler optional, so a training checkpoint also serves as weights). ``skip_model_keys``: model keys
    left as they are (a fresh critic head over a policy checkpoint). Returns the saved ``extra`` dict, or
    None if there is no checkpoint. Without an optimizer any layout loads; with one, TP/PP must match the
    saving run's."""
    step = latest_step(root) if step is None else step
    if step is None:
        return None
    directory = iteration_dir(root, step)
    chunks = _unwrap(model)
    if optimizer is not None:
        # The optimizer's sharded state needs allocated Adam moments to load into.
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values"):  # the distributed optimizer
                inner._init_optimizer_states_with_dummy_values()
    if skip_model_keys and optimizer is not None:
        raise ValueError("skip_model_keys loads weights only: pass no optimizer")
    state = _sharded_state(model, optimizer, is_loading=True, skip_model_keys=skip_model_keys)
    saved_world = saved_extra(root).get("world_size")
    same_world = saved_world == dist.get_world_size()
    if restore_rng and same_world:
        state["rng"] = _rng_object(None)
    loaded = dist_checkpointing.load(state, str(directory))
    for i, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(loaded[_model_key(i, len(chunks))], strict=False)
        # Keys megatron never saves (e.g. TE's _extra_state) and the skipped ones may be missing.
        missing = [k for k in missing if k not in skip_model_keys and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"checkpoint {directory} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng and same_world:
        _set_rng_state(loaded["rng"])
    return loaded["extra"]


def _restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16 records the Adam step count in each param group (``group["step"]``), but on the
    torch-Adam path (no TE/apex) a loaded optimizer keeps the per-parameter ``step`` of the dummy states
    it was initialised with, and may share one tensor between all parameters (torch would then bump it
    once per parameter per update). Either way the resumed run diverges silently: give every parameter
    its own step tensor with the saved count."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        for group in torch_optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = torch_optimizer.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
