"""``megatron-ovr <command>``: the launch entry point (run it under torchrun for several processes).

    torchrun --nproc-per-node 2 -m megatron_ovr sft --config examples/cold_start/tiny.yaml
    torchrun --nproc-per-node 2 -m megatron_ovr ppo --config examples/rl/tiny.yaml
    megatron-ovr sft --config FILE --set train_steps=20 --set parallel.tensor_parallel=2
"""

from __future__ import annotations

import argparse
import sys


def _sft(args: argparse.Namespace) -> int:
    from megatron_ovr.config.io import load_yaml
    from megatron_ovr.config.sft import SFTConfig
    from megatron_ovr.training.sft import run_sft

    run_sft(load_yaml(SFTConfig, args.config, args.set))
    return 0


def _ppo(args: argparse.Namespace) -> int:
    from megatron_ovr.config.io import load_yaml
    from megatron_ovr.config.ppo import PPOConfig
    from megatron_ovr.rl.driver import run_ppo

    run_ppo(load_yaml(PPOConfig, args.config, args.set))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from megatron_ovr.eval.commands import eval_main

    return eval_main(["--config", args.config, *(f"--set={override}" for override in args.set)])


COMMANDS = {"sft": (_sft, "Stage 1: linguistic cold-start SFT"),
            "ppo": (_ppo, "Stage 2: multimodal PPO with vLLM rollouts (megatron_ovr/rl)"),
            "eval": (_eval, "Benchmark evaluation of an HF checkpoint (megatron_ovr/eval)")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ovr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", required=True, help="YAML file mirroring the config dataclasses")
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override one field, e.g. --set train_steps=10 (repeatable)")
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
