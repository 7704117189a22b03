"""Stage 2: rollout engines behind one seam (``engine``), vLLM the production one."""
