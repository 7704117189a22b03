"""Configuration of the Stage-1 cold-start SFT run; ``examples/cold_start/*.yaml`` mirror it field for field.

Each section is handed only to the component that owns it (model builder, data loader, optimizer, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import DTYPES, require
from .parallel import ParallelConfig


@dataclass(kw_only=True)
class ModelSection:
    preset: str | None = "tiny"
    """A preset name (megatron_ovr.config.PRESETS), used when ``hf_dir`` is not set (random init)."""
    hf_dir: str | None = None
    """Start from this HF checkpoint directory (config and weights)."""
    megatron_dir: str | None = None
    """Start from the weights of this megatron checkpoint (tools/convert_hf_to_megatron.py output, or an
    earlier run's checkpoint; its optimizer state is ignored), at any layout."""
    dtype: str = "float32"
    freeze_vision: bool = True
    """The linguistic cold start trains the language model only: vision tower and merger stay frozen."""
    freeze_merger: bool = True
    freeze_language: bool = False
    recompute: bool = False
    """Full activation recomputation of every decoder layer (memory for compute at long sequences)."""

    def __post_init__(self) -> None:
        sources = [s for s in (self.hf_dir, self.megatron_dir) if s is not None]
        require(len(sources) <= 1, "model.megatron_dir", self.megatron_dir, "set model.hf_dir or model.megatron_dir, not both")
        require(self.preset is not None or sources, "model.preset", self.preset,
               "set model.preset, model.hf_dir or model.megatron_dir")
        require(self.dtype in DTYPES, "model.dtype", self.dtype, f"choose one of {sorted(DTYPES)}")


@dataclass(kw_only=True)
class DataSection:
    paths: list[str] = field(default_factory=list)
    """Tokenised dataset prefixes written by tools/preprocess_sft.py."""
    weights: list[float] | None = None
    """Mixing weights, one per path (None: proportional to size)."""
    seq_length: int = 1024
    packed: bool = True
    """Pack several samples per row (attention and positions restart per sample)."""
    seed: int = 1234

    def __post_init__(self) -> None:
        require(len(self.paths) > 0, "data.paths", self.paths, "give at least one tokenised dataset prefix")
        require(self.weights is None or len(self.weights) == len(self.paths), "data.weights", self.weights,
               f"needs one weight per path ({len(self.paths)})")
        require(self.seq_length > 0, "data.seq_length", self.seq_length, "must be positive")


@dataclass(kw_only=True)
class BatchSection:
    global_batch_size: int = 8
    """Rows (packed sequences) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        require(self.global_batch_size % self.micro_batch_size == 0, "batch.global_batch_size",
               self.global_batch_size, f"must be a multiple of batch.micro_batch_size={self.micro_batch_size}")


@dataclass(kw_only=True)
class OptimizerSection:
    lr: float = 2e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "cosine"
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        styles = ("constant", "linear", "cosine")
        require(self.decay_style in styles, "optimizer.decay_style", self.decay_style, f"choose one of {styles}")
        require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, "needs 0 <= min_lr <= lr")


@dataclass(kw_only=True)
class CheckpointSection:
    dir: str | None = None
    """Where checkpoints go (iter_NNNNNNN/ and a 'latest' pointer); None: never save."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM)."""
    load: str | None = None
    """Resume from this checkpoint directory (its 'latest' iteration); default: ``dir`` if it has one."""


@dataclass(kw_only=True)
class LoggingSection:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_mode: str = "offline"
    plot_path: str | None = None
    """Write a PNG of the loss curve here at the end."""
    metrics_path: str | None = None
    """Append every logged step as a JSON line here (appends across resumes)."""


@dataclass(kw_only=True)
class SFTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataSection
    batch: BatchSection = field(default_factory=BatchSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    train_steps: int = 100
    seed: int = 1234
    exit_after_steps: int | None = None
    """Save and exit once this process has run this many steps (time-limited queues run a long schedule
    in chunks); the LR schedule still spans ``train_steps``."""
    nan_policy: str = "skip"
    """What a non-finite loss or gradient does: 'skip' the step (no update, counted and logged) or 'stop'."""

    def __post_init__(self) -> None:
        policies = ("skip", "stop")
        require(self.nan_policy in policies, "nan_policy", self.nan_policy, f"choose one of {policies}")
        require(self.train_steps > 0, "train_steps", self.train_steps, "must be positive")
        require(self.optimizer.warmup_steps < self.train_steps, "optimizer.warmup_steps", self.optimizer.warmup_steps,
                f"must be below train_steps={self.train_steps}")
