"""The rollout-to-loss path: collaborators of `RLSDTrainer` handed values and callables, never the trainer."""
