"""Post-training: chat SFT data, GRPO, distillation (the gym of tasks and rewards is ``gasungbi.gym``)."""
