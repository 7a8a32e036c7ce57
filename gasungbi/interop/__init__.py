"""Interchange with the ecosystem: Hugging Face checkpoints (``hf``)."""
