"""Benchmark evaluation of an HF checkpoint (the same command as ``megatron-ovr eval``).

    python tools/evaluate.py --config examples/eval/tiny.yaml --set engine.hf_dir=outputs/tiny/hf

See ``--help`` for the outputs and megatron_ovr/eval/benchmarks.py for the benchmark file layouts.
"""

import sys

from megatron_ovr.eval.commands import eval_main

if __name__ == "__main__":  # vLLM re-imports the main module in the processes it spawns
    sys.exit(eval_main())
