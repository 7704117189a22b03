"""Stage 2: the PPO driver. One iteration:

1. generate: each rank's colocated engine samples ``samples_per_prompt`` responses for its share of the
   iteration's prompts (text and image questions mixed);
2. reward: the rule reward scores them (1/0, 0 when truncated); the rollouts are gathered over the
   data-parallel replica (every TP/PP/CP rank of a replica trains on the same samples);
3. old log-probs and values: forward-only passes of the actor and the critic (megatron) on the packed rollouts;
4. GAE on token-level values with the reward on the last token, batch-level advantage normalisation;
5. ``actor_steps`` actor steps (clipped PPO objective) and ``critic_steps`` critic steps (value loss), each
   on a mini-batch of the rollouts, packed by token budget;
6. weight sync: the actor's weights stream into the engine; log, checkpoint.

The whole RL state (actor, critic, optimizers, prompt position, RNG, iteration) is checkpointed atomically:
the critic is saved first, the actor last, and the actor's ``latest`` pointer is the commit point.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from megatron_ovr import platform
from megatron_ovr.config.io import to_dict
from megatron_ovr.config.ppo import PPOConfig
from megatron_ovr.data.prompts import build_prompt
from megatron_ovr.data.tokenizer import qwen_tokenizer_dir
from megatron_ovr.distributed import init_distributed, is_reporting_rank, replica_group, shutdown_distributed
from megatron_ovr.eval.benchmarks import BenchmarkItem, load_benchmark
from megatron_ovr.rollout import RolloutRequest, SamplingSettings, build_engine
from megatron_ovr.rollout.model_dir import ImageProcessor, write_engine_dir
from megatron_ovr.rollout.weight_sync import sync_weights
from megatron_ovr.training import checkpointing
from megatron_ovr.training.core import ModelTrainer
from megatron_ovr.training.metrics import MetricsLogger
from megatron_ovr.training.preemption import SaveAndStopPolicy

from . import algorithms
from .experience import PackedBatch, Sample, pack_samples, split_into_minibatches, token_log_probs_and_entropy
from .reward import build_reward

ACTOR_LOSS_KEYS = ("action_mask", "old_log_probs", "advantages")
CRITIC_LOSS_KEYS = ("action_mask", "old_values", "returns")
# Both models run their heads only where a response token is scored: the rest of a packed row (prompts,
# image tokens, padding) needs no log-probability or value, and the policy's head is a matmul and a softmax
# over the whole vocabulary per position.
HEAD_MASK = "action_mask"


class PromptStream:
    """The prompts in a seeded order, reshuffled every epoch; its position is part of the checkpoint."""

    def __init__(self, items: Sequence[BenchmarkItem], seed: int):
        if not items:
            raise ValueError("the prompt files hold no items")
        self.items, self.seed = list(items), seed
        self.epoch = self.position = 0

    def next_batch(self, count: int) -> list[BenchmarkItem]:
        batch = []
        while len(batch) < count:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))
            take = min(count - len(batch), len(order) - self.position)
            batch += [self.items[i] for i in order[self.position:self.position + take]]
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


@dataclass
class Rollout:
    """One sampled response with what the trainer needs of it (picklable: gathered over the replica)."""

    item: int
    """Index of its prompt in the replica's share of the iteration."""
    prompt_ids: list[int]
    response_ids: list[int]
    engine_log_probs: list[float]
    truncated: bool
    reward: float


# ---- losses handed to the training core (per-token, see training.core.LossFn) -------------------------

def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values.float() * mask).sum()


def actor_loss(clip_ratio: float):
    def loss_fn(local: dict[str, torch.Tensor], negative_log_probs: torch.Tensor):
        mask = local["action_mask"]
        terms = algorithms.policy_loss(-negative_log_probs, local["old_log_probs"], local["advantages"], clip_ratio)
        total, count = _masked_sum(terms.loss, mask), mask.sum()
        report = {
            "loss": torch.stack([total.detach(), count]),
            "clip_frac": torch.stack([_masked_sum(terms.clipped, mask), count]),
            "approx_kl": torch.stack([_masked_sum(terms.approx_kl, mask), count]),
        }
        return total, count.to(torch.int), report

    return loss_fn


def critic_loss(value_clip: Optional[float]):
    def loss_fn(local: dict[str, torch.Tensor], values: torch.Tensor):
        mask = local["action_mask"]
        terms = algorithms.value_loss(values.float(), local["old_values"], local["returns"], value_clip)
        total, count = _masked_sum(terms.loss, mask), mask.sum()
        report = {"loss": torch.stack([total.detach(), count]),
                  "clip_frac": torch.stack([_masked_sum(terms.clipped, mask), count])}
        return total, count.to(torch.int), report

    return loss_fn


# ---- what the forward-only passes keep of each model's output (training.core.ModelTrainer.forward_only) ------

def reduce_log_probs_and_entropy(logits: torch.Tensor, local: dict) -> torch.Tensor:
    """The actor's ``[2, ...]``: log p(sampled token) and the entropy of the next-token distribution."""
    return torch.stack(token_log_probs_and_entropy(logits, local["labels"]))


def reduce_values(values: torch.Tensor, local: dict) -> torch.Tensor:
    """The critic's ``[1, ...]``: its values."""
    return values[None]


class PPODriver:
    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        algo = cfg.algorithm
        self.actor = ModelTrainer(cfg.actor, cfg.parallel, cfg.actor_optimizer, cfg.iterations * algo.actor_steps,
                                  seed=cfg.seed)
        self.critic = ModelTrainer(cfg.critic_model, cfg.parallel, cfg.critic_optimizer,
                                   cfg.iterations * algo.critic_steps, head="value", seed=cfg.seed)
        self.model_cfg = self.actor.model_cfg
        items = [item for path in cfg.data.paths for item in load_benchmark(path, layout=cfg.data.layout)]
        self.prompts = PromptStream(items, cfg.data.seed)
        self.iteration = 0
        self._check_batch_shape()
        self.reward = build_reward(algo.reward, **algo.reward_options)
        self.metrics = MetricsLogger(
            enabled=is_reporting_rank(), tensorboard_dir=cfg.logging.tensorboard_dir,
            wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
            wandb_config=to_dict(cfg), jsonl_path=cfg.logging.metrics_path,
        )
        self._resume()
        self.control = SaveAndStopPolicy(total=cfg.iterations, save_interval=cfg.checkpoint.save_interval,
                                         exit_after=cfg.exit_after_iterations, first=self.iteration, unit="iteration")
        self._start_engine()

    # ---- set-up ------------------------------------------------------------------------------------

    def _check_batch_shape(self) -> None:
        dp = parallel_state.get_data_parallel_world_size()
        per_replica = self.cfg.rollout.prompts_per_iteration // dp
        if per_replica * dp != self.cfg.rollout.prompts_per_iteration:
            raise ValueError(f"rollout.prompts_per_iteration={self.cfg.rollout.prompts_per_iteration} must be a "
                             f"multiple of the data-parallel size {dp}")
        samples = per_replica * self.cfg.rollout.samples_per_prompt
        steps = max(self.cfg.algorithm.actor_steps, self.cfg.algorithm.critic_steps)
        if samples < steps:
            raise ValueError(f"each data-parallel replica gets {samples} samples per iteration, fewer than the "
                             f"{steps} mini-batches of algorithm.actor_steps / critic_steps")
        self.prompts_per_replica = per_replica

    def _checkpoint_roots(self, root: str) -> tuple[str, str]:
        return str(Path(root) / "actor"), str(Path(root) / "critic")

    def _resume(self) -> None:
        root = self.cfg.checkpoint.load or self.cfg.checkpoint.dir
        if not root:
            return
        actor_root, critic_root = self._checkpoint_roots(root)
        step = checkpointing.latest_step(actor_root) if Path(actor_root).exists() else None
        if step is None:
            return
        # The critic of the same iteration exists: it is saved before the actor commits.
        self.critic.load(critic_root, step=step, restore_rng=False)
        extra = self.actor.load(actor_root, step=step)
        self.iteration = extra["iteration"]
        self.prompts.load_state_dict(extra["prompts"])
        if dist.get_rank() == 0:
            print(f"megatron-ovr: resumed PPO from {root} at iteration {self.iteration}", flush=True)

    def _start_engine(self) -> None:
        rollout = self.cfg.rollout
        hf_dir = self.cfg.actor.hf_dir
        has_tokenizer = hf_dir is not None and (Path(hf_dir) / "tokenizer.json").is_file()
        tokenizer_dir = rollout.tokenizer_dir or (hf_dir if has_tokenizer else qwen_tokenizer_dir())
        # Every rank writes its own small directory (config, tokenizer, image config): no shared filesystem needed.
        self.engine_dir = Path(tempfile.mkdtemp(prefix="megatron-ovr-engine-"))
        write_engine_dir(self.engine_dir, self.model_cfg, tokenizer_dir,
                         min_pixels=rollout.image_min_pixels, max_pixels=rollout.image_max_pixels)
        self.images = ImageProcessor(self.engine_dir)
        most_images = max((len(item.images) for item in self.prompts.items), default=0)
        # The engine reseeds the process RNGs while it starts; its guard restores them (exact resume).
        self.engine = build_engine(
            rollout.engine, model_dir=str(self.engine_dir), max_model_len=rollout.longest_sample,
            dtype=rollout.dtype, seed=self.cfg.seed, gpu_memory_utilization=rollout.gpu_memory_utilization,
            max_images_per_prompt=max(most_images, 1), dummy_weights=True,
        )
        if dist.get_rank() == 0:
            print(f"megatron-ovr: rollout engine {self.engine.info.name} {self.engine.info.details}", flush=True)
        self._sync_weights()

    def _sync_weights(self):
        self.engine.wake_up()
        return sync_weights(self.actor.chunks, self.model_cfg, self.engine,
                            bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb * 2**20)

    # ---- one iteration -----------------------------------------------------------------------------

    def _my_prompts(self, items: list[BenchmarkItem]) -> tuple[list[BenchmarkItem], range]:
        """This replica's prompts, and the indices among them this rank generates for."""
        dp_rank = parallel_state.get_data_parallel_rank()
        replica_items = items[dp_rank * self.prompts_per_replica:(dp_rank + 1) * self.prompts_per_replica]
        group = replica_group()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [round(k * len(replica_items) / size) for k in range(size + 1)]
        return replica_items, range(bounds[rank], bounds[rank + 1])

    def _generate(self, replica_items: list[BenchmarkItem], mine: range) -> tuple[list[Rollout], list[str]]:
        """This rank's rollouts (reward not yet set) and their texts."""
        cfg = self.cfg.rollout
        requests = []
        for i in mine:
            item = replica_items[i]
            images = item.load_images()
            requests.append(RolloutRequest(build_prompt(item.question, len(images), item.choices), images))
        # A distinct, reproducible seed per iteration and rank: a resumed run draws the same samples.
        seed = ((self.cfg.seed * 1_000_003 + self.iteration) * 4096 + dist.get_rank()) % 2**31
        sampling = SamplingSettings(max_new_tokens=cfg.max_new_tokens_at(self.iteration), temperature=cfg.temperature,
                                    top_p=cfg.top_p, samples_per_prompt=cfg.samples_per_prompt, seed=seed)
        completions = self.engine.generate(requests, sampling) if requests else []
        self.engine.sleep()
        rollouts = [Rollout(i, c.prompt_token_ids, c.token_ids, c.log_probs, c.truncated, reward=0.0)
                    for i, per_prompt in zip(mine, completions) for c in per_prompt]
        return rollouts, [c.text for per_prompt in completions for c in per_prompt]

    def _score(self, rollouts: list[Rollout], texts: list[str], replica_items: list[BenchmarkItem]) -> None:
        items = [replica_items[r.item] for r in rollouts]
        scores = self.reward.score_batch(texts, [item.answer for item in items], [r.truncated for r in rollouts],
                                         [item.choices for item in items])
        for rollout, score in zip(rollouts, scores):
            rollout.reward = score

    def _samples(self, rollouts: list[Rollout], replica_items: list[BenchmarkItem]) -> list[Sample]:
        pixels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        samples = []
        for r in rollouts:
            item = replica_items[r.item]
            if item.images and r.item not in pixels:
                pixels[r.item] = self.images(item.load_images())
            pixel_values, grid = pixels.get(r.item, (None, None))
            samples.append(Sample(r.prompt_ids, r.response_ids, pixel_values, grid))
        return samples

    def _pack(self, samples: Sequence[Sample]) -> PackedBatch:
        min_rows = self.cfg.parallel.pipeline_parallel if self.cfg.parallel.virtual_pipeline else 1
        return pack_samples(samples, self.cfg.algorithm.micro_batch_tokens, self.model_cfg,
                            pad_id=self.model_cfg.bos_token_id, min_rows=min_rows)

    def _update(self, trainer: ModelTrainer, samples: list[Sample], steps: int, per_token: dict, loss_fn, keys):
        """``steps`` optimizer steps, one per mini-batch of the samples; returns the averaged step metrics."""
        results = []
        for indices in split_into_minibatches(len(samples), steps):
            packed = self._pack([samples[i] for i in indices])
            microbatches = packed.with_per_token(**{k: v[indices] for k, v in per_token.items()})
            results.append(trainer.train_step(microbatches, loss_fn, keys, head_mask=HEAD_MASK))
        metrics = {k: float(np.mean([r.metrics[k] for r in results])) for k in results[0].metrics}
        metrics["grad_norm"] = float(np.mean([r.grad_norm for r in results if r.grad_norm is not None] or [np.nan]))
        metrics["lr"] = trainer.optimizer.param_groups[0]["lr"]
        return metrics

    def run_iteration(self) -> dict[str, float]:
        cfg, algo = self.cfg, self.cfg.algorithm
        times: dict[str, float] = {}

        @contextmanager
        def timed(name: str):
            start = time.perf_counter()
            yield
            times[f"time/{name}_s"] = time.perf_counter() - start

        items = self.prompts.next_batch(cfg.rollout.prompts_per_iteration)
        replica_items, mine = self._my_prompts(items)
        with timed("generate"):
            rollouts, texts = self._generate(replica_items, mine)
        with timed("reward"):
            self._score(rollouts, texts, replica_items)
            gathered: list = [None] * dist.get_world_size(replica_group())
            dist.all_gather_object(gathered, rollouts, group=replica_group())
            rollouts = [r for part in gathered for r in part]
        samples = self._samples(rollouts, replica_items)
        packed = self._pack(samples)
        mask = packed.response_mask()
        with timed("old_logprob_values"):
            actor_out = self.actor.forward_only(packed.microbatches, reduce_log_probs_and_entropy, num_outputs=2,
                                                head_mask=HEAD_MASK)
            old_log_probs = packed.to_samples([o[0] for o in actor_out])
            entropy = packed.to_samples([o[1] for o in actor_out])
            values = packed.to_samples([o[0] for o in self.critic.forward_only(packed.microbatches, reduce_values,
                                                                                head_mask=HEAD_MASK)])
        dp_group = parallel_state.get_data_parallel_group()
        scores = torch.tensor([r.reward for r in rollouts])
        rewards = algorithms.final_token_rewards(scores, mask)
        advantages, returns = algorithms.compute_gae(rewards, values, mask, algo.gamma, algo.lam)
        if algo.normalize_advantages:
            advantages = algorithms.masked_whiten(advantages, mask, group=dp_group)
        with timed("actor_update"):
            actor_metrics = self._update(self.actor, samples, algo.actor_steps,
                                         {"old_log_probs": old_log_probs, "advantages": advantages},
                                         actor_loss(algo.clip_ratio), ACTOR_LOSS_KEYS)
        with timed("critic_update"):
            critic_metrics = self._update(self.critic, samples, algo.critic_steps,
                                          {"old_values": values, "returns": returns},
                                          critic_loss(algo.value_clip), CRITIC_LOSS_KEYS)
        with timed("weight_sync"):
            self._sync_weights()
        self.iteration += 1

        engine_log_probs = torch.zeros_like(old_log_probs)
        for i, r in enumerate(rollouts):
            engine_log_probs[i, : len(r.engine_log_probs)] = torch.tensor(r.engine_log_probs)
        token_stats = torch.stack([
            algorithms.masked_mean(entropy, mask, group=dp_group),
            algorithms.masked_mean((engine_log_probs - old_log_probs).abs(), mask, group=dp_group),
        ])
        everyone: list = [None] * parallel_state.get_data_parallel_world_size()
        image_id = self.model_cfg.image_token_id
        dist.all_gather_object(everyone, [(len(r.response_ids), r.truncated, r.reward, image_id in r.prompt_ids)
                                          for r in rollouts], group=dp_group)
        lengths, truncated, rewards_all, with_image = zip(*[x for part in everyone for x in part])
        metrics = {
            **algorithms.rollout_stats(lengths, truncated, rewards_all, with_image),
            "entropy": float(token_stats[0]),
            "engine_logprob_abs_diff": float(token_stats[1]),
            "value_explained_variance": algorithms.explained_variance(values, returns, mask),
            **{f"actor/{k}": v for k, v in actor_metrics.items()},
            **{f"critic/{k}": v for k, v in critic_metrics.items()},
            "max_new_tokens": cfg.rollout.max_new_tokens_at(self.iteration - 1),
            **times,
        }
        metrics["time/iteration_s"] = sum(times.values())
        return metrics

    # ---- the loop ----------------------------------------------------------------------------------

    def save(self) -> None:
        root = self.cfg.checkpoint.dir
        if not root:
            return
        actor_root, critic_root = self._checkpoint_roots(root)
        extra = {"iteration": self.iteration, "prompts": self.prompts.state_dict(), "config": to_dict(self.cfg)}
        self.critic.save(critic_root, self.iteration, extra)
        self.actor.save(actor_root, self.iteration, extra)  # the commit point

    def train(self) -> list[dict]:
        cfg = self.cfg
        while self.iteration < cfg.iterations:
            metrics = self.run_iteration()
            if self.iteration % cfg.logging.log_interval == 0:
                self.metrics.log(self.iteration, metrics)
            if self.control.after_step(self.iteration, self.save):
                break
        if cfg.logging.plot_path:
            self.metrics.plot(cfg.logging.plot_path, keys=("reward/mean", "response_length/mean", "critic/loss"),
                              title="PPO")
        return self.metrics.history

    def close(self) -> None:
        self.metrics.close()
        self.reward.close()
        self.engine.close()
        shutil.rmtree(self.engine_dir, ignore_errors=True)


def run_ppo(cfg: PPOConfig) -> list[dict]:
    """Runs (or resumes) PPO in this process group; returns the logged history."""
    init_distributed(cfg.parallel, seed=cfg.seed)
    if dist.get_rank() == 0:
        print(platform.describe_backends(), flush=True)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    driver = PPODriver(cfg)
    try:
        history = driver.train()
    finally:
        driver.close()
    shutdown_distributed()
    return history
