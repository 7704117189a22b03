"""Runs the SFT entry point (``run_sft``) for the trainer tests, optionally with a loss that turns NaN at
one step, to exercise the NaN policy. Launched by torchrun or as a plain process."""

import argparse
import itertools

import torch

from megatron_ovr.config.io import load_yaml
from megatron_ovr.config.sft import SFTConfig
from megatron_ovr.training.losses import masked_token_loss
from megatron_ovr.training.sft import run_sft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--nan-at-call", type=int, default=None, help="0-based loss_fn call that returns NaN")
    args = parser.parse_args()
    cfg = load_yaml(SFTConfig, args.config, args.set)
    calls = itertools.count()

    def loss_fn(per_token, per_token_loss):
        total, count, report = masked_token_loss(per_token, per_token_loss)
        if next(calls) == args.nan_at_call:
            total = total * torch.tensor(float("nan"))
            report = {"loss": torch.stack([total.detach(), count.float()])}
        return total, count, report

    run_sft(cfg, loss_fn=loss_fn)


if __name__ == "__main__":
    main()
