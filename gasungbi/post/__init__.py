"""Post-training: chat SFT data, GRPO, distillation, and the reasoning gym (tasks and rewards)."""
