"""Per-step metrics: a console line, TensorBoard, wandb (offline unless configured), and a PNG of the
curves at the end. Only the rank that holds the reduced metrics writes (``enabled``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(
        self,
        *,
        enabled: bool,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        wandb_mode: str = "offline",
        wandb_config: Optional[dict] = None,
        jsonl_path: Optional[str] = None,
    ):
        self.enabled = enabled
        self.history: list[dict] = []
        self._tb = self._wandb = self._jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, config=wandb_config)
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl_path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.history.append({"step": step, **metrics})
        parts = [f"step {step:>6}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        print(" | ".join(parts), flush=True)
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()

    def plot(self, path: str, keys: tuple[str, ...] = ("loss",), title: str = "") -> None:
        """A PNG with one panel per metric over steps."""
        if not self.enabled or not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(h["step"], h[key]) for h in self.history if key in h and math.isfinite(h[key])]
            ax.plot([p[0] for p in points], [p[1] for p in points])
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
