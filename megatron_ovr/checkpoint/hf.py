"""Streaming reader and writer of HF Qwen2.5-VL checkpoint directories (``config.json`` + safetensors).

Contract:
- ``HFCheckpoint(path)`` opens a directory holding ``config.json`` and either ``model.safetensors`` or
  sharded ``model-0000i-of-0000n.safetensors`` files listed in ``model.safetensors.index.json``. Opening
  reads only the config and the safetensors headers; ``get(name)`` reads one tensor. ``names()`` are the
  canonical on-disk names (``visual.*``, ``model.*``, ``lm_head.*``); ``get`` also accepts transformers'
  in-memory names. Every failure names the offending file or tensor.
- ``write_hf_checkpoint(out_dir, cfg, tensors)`` streams ``(name, tensor)`` pairs into shards of at most
  ``max_shard_bytes`` (a larger single tensor gets a shard of its own), holding one shard in memory, and
  writes the index, ``config.json`` and ``generation_config.json``. Everything is written into a temp
  directory next to ``out_dir`` that is renamed at the end, so a failure never leaves a partial ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.mapping.qwen2_5_vl import canonical_hf_name
from megatron_ovr.mapping.stream import check_hf_names, load_hf_weights

# Tokenizer and processor files a served or evaluated checkpoint needs next to the weights.
AUXILIARY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_header_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or corrupt?)") from e


class HFCheckpoint:
    """A lazily read HF checkpoint directory; see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.path} does not exist")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"HF checkpoint {self.path} has no config.json")
        self.config = Qwen25VLConfig.from_hf_config(json.loads(config_file.read_text()))
        # canonical name -> (file, the key stored in that file)
        self._where: dict[str, tuple[Path, str]] = {}
        index_file = self.path / INDEX_FILE
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            shard_keys = {}
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise FileNotFoundError(f"{index_file} names shard {shard}, which does not exist in {self.path}")
                # Headers only: a truncated shard or a stale index fails here, not halfway through a load.
                shard_keys[shard] = set(_read_header_keys(self.path / shard))
            for key, shard in weight_map.items():
                if key not in shard_keys[shard]:
                    raise KeyError(f"{index_file} puts tensor {key!r} in {shard}, which does not hold it")
            stored = [(self.path / shard, key) for key, shard in weight_map.items()]
        elif (self.path / SINGLE_FILE).is_file():
            stored = [(self.path / SINGLE_FILE, key) for key in _read_header_keys(self.path / SINGLE_FILE)]
        else:
            raise FileNotFoundError(f"HF checkpoint {self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        for file, key in stored:
            self._where[canonical_hf_name(key)] = (file, key)

    def names(self) -> list[str]:
        return list(self._where)

    def load_into(self, model_chunks) -> None:
        """Checks that the tensor names are exactly the config's, then loads this rank's shards into the
        megatron model chunks, one tensor at a time."""
        check_hf_names(self.config, self.names())
        load_hf_weights(model_chunks, self.config, self.get)

    def get(self, name: str) -> torch.Tensor:
        canonical = canonical_hf_name(name)
        if canonical not in self._where:
            raise KeyError(f"tensor {name!r} is not in HF checkpoint {self.path}")
        file, key = self._where[canonical]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read tensor {key!r} from {file}: {e} (truncated or corrupt?)") from e


def _prepare(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    tensor = tensor.detach().to("cpu", dtype).contiguous()
    # safetensors refuses tensors that share storage (e.g. gate and up chunks of one fused tensor): a view
    # into a larger storage gets its own copy.
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _apply_umask(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only entries (0700 / 0600); a checkpoint gets the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    cfg: Qwen25VLConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = 2**30,
    dtype: Optional[torch.dtype] = None,
    auxiliary_from: Optional[str | os.PathLike] = None,
) -> Path:
    """Writes a sharded HF checkpoint (on-disk tensor names) into ``out_dir``, which must not exist or be
    empty. ``auxiliary_from``: a directory whose tokenizer/processor files (``AUXILIARY_FILES``) are copied
    along (its generation config replaces the default one). Returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shard_of: dict[str, int] = {}  # name -> number of the shard (from 1) that holds it
        shard: dict[str, torch.Tensor] = {}
        shard_bytes = total_bytes = written = 0
        float_dtypes: set[torch.dtype] = set()

        def flush() -> None:
            nonlocal shard, shard_bytes, written
            written += 1
            save_file(shard, str(tmp / f"shard-{written}.safetensors"), metadata={"format": "pt"})
            shard_of.update(dict.fromkeys(shard, written))
            shard, shard_bytes = {}, 0

        for name, tensor in tensors:
            name = canonical_hf_name(name)
            if name in shard_of or name in shard:
                raise ValueError(f"tensor {name!r} is given twice")
            tensor = _prepare(tensor, dtype)
            if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
                flush()
            shard[name] = tensor
            shard_bytes += tensor.nbytes
            total_bytes += tensor.nbytes
            if tensor.is_floating_point():
                float_dtypes.add(tensor.dtype)
        if not shard:
            raise ValueError("no tensors to write")
        flush()

        # The shard count is known only now: give the files their final ``-of-`` names.
        final = {i: f"model-{i:05d}-of-{written:05d}.safetensors" for i in range(1, written + 1)}
        for i, file_name in final.items():
            (tmp / f"shard-{i}.safetensors").rename(tmp / file_name)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": {n: final[i] for n, i in shard_of.items()}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf_config = cfg.to_hf_config()
        if len(float_dtypes) == 1:  # the config states the dtype the weights are stored in
            hf_config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        # Qwen ends generation at <|im_end|> and at <|endoftext|> (which is also its bos and pad token).
        generation = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.bos_token_id,
                      "eos_token_id": [cfg.eos_token_id, cfg.bos_token_id]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if auxiliary_from is not None:
            for file_name in AUXILIARY_FILES:
                if (Path(auxiliary_from) / file_name).is_file():
                    shutil.copyfile(Path(auxiliary_from) / file_name, tmp / file_name)
        _apply_umask(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); a rename cannot replace it portably
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
