"""The training core shared by SFT and the PPO actor/critic updates: megatron schedules, DDP, the
distributed optimizer, atomic checkpoints, preemption handling and metrics."""
