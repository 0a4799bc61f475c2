"""The RL trainer: update step, optimizer, and (growing) the rollout-to-update loop."""
