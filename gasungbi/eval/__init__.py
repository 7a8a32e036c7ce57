"""Evaluation: validation loss and bits per byte, gym accuracy (pass@k), lm-evaluation-harness tasks, plots."""
