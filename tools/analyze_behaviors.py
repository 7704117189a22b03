"""Cognitive-behaviour analysis of saved generations with an LLM judge: emergence rates and the Behaviour
Transfer Rate, as a table, JSON and a bar chart.

    python tools/analyze_behaviors.py --generations outputs/eval/generations.jsonl --benchmark mathvision \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct --output-dir outputs/behaviors
    python tools/analyze_behaviors.py --generations examples/eval/sample_generations.jsonl --offline-judge \\
        --output-dir outputs/behaviors_demo
"""

import sys

from megatron_ovr.eval.commands import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
