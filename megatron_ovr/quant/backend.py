"""The one seam to NVIDIA Model Optimizer (``nvidia-modelopt``): found without importing it, imported only
when a quantisation runs.

``HAVE_MODELOPT`` says whether it is installed; :func:`require_modelopt` imports its PyTorch quantisation and
HF export and raises an ``ImportError`` with the install command when it cannot; :func:`describe` is the
start-up line naming the active path (modelopt version, device, transformers version). Nothing else in
megatron-ovr imports modelopt.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

INSTALL_HINT = (
    "pip install 'megatron-ovr[quant]' (nvidia-modelopt[hf] 0.47.0; GPU images: the Dockerfile installs it; on a "
    "CPU test environment `pip install --no-deps nvidia-modelopt==0.47.0` next to torch and transformers is enough)"
)

HAVE_MODELOPT: bool = importlib.util.find_spec("modelopt") is not None


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def require_modelopt() -> SimpleNamespace:
    """``mtq`` (``modelopt.torch.quantization``), ``export_hf_checkpoint``, the fused-layer pass the export
    runs first (``requantize_resmooth_fused_llm_layers``) and ``max_calibrate``, or an ``ImportError`` saying
    how to install modelopt."""
    try:
        import warnings

        with warnings.catch_warnings():
            # modelopt warns on every import that it was not tested with this transformers release.
            warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint
            from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
            from modelopt.torch.quantization.model_calib import max_calibrate
    except ImportError as err:
        raise ImportError(f"quantised export needs NVIDIA Model Optimizer ({err}): {INSTALL_HINT}") from err
    return SimpleNamespace(mtq=mtq, export_hf_checkpoint=export_hf_checkpoint,
                           requantize_resmooth_fused_llm_layers=requantize_resmooth_fused_llm_layers,
                           max_calibrate=max_calibrate,
                           version=_version("nvidia-modelopt") or "unknown")


def describe(device: str) -> str:
    """The start-up line: which quantisation path is active."""
    modelopt = f"nvidia-modelopt {_version('nvidia-modelopt') or '?'}" if HAVE_MODELOPT else "nvidia-modelopt absent"
    return (f"megatron-ovr quantize: {modelopt} (PyTorch fake-quant calibration + unified HF export); "
            f"device={device}; transformers {_version('transformers') or '?'}")
