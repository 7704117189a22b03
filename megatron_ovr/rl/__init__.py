"""Stage 2: PPO math as small pure functions (``algorithms``), rule rewards (``reward``), the critic and the driver."""
