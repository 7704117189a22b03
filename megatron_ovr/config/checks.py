"""Validation helpers shared by the config dataclasses: errors name the field and its value."""

from __future__ import annotations

from typing import Any

import torch

# The dtype names configs and command lines accept.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require(cond: bool, field_name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}={value!r}: {why}")
