"""Errors a user can fix; the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """An error caused by the user's input (a bad path, flag, preset or file); names what is wrong."""


def run_dir_hint(path) -> str:
    """When ``path`` is a run directory or its ``latest`` pointer file rather than a checkpoint, the
    error message saying so and naming the checkpoint to pass instead (the one ``latest`` points to);
    when it holds LoRA adapters, the message naming the command that merges them; otherwise ''.

    Commands that read a checkpoint take the checkpoint directory itself (``RUN/step_N``), as
    ``from_pretrained`` does; this keeps the error for the easy slip of passing the run one level up
    from being a bare "no config.json" or "not a valid tokenizer.json".
    """
    from pathlib import Path

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return (f"{path} holds LoRA adapters (adapter_config.json), not a model: write the model with the adapters "
                f"merged by `gasungbi export-hf --merge-lora {path} OUT`")
    pointer = path if path.name == "latest" and path.is_file() else path / "latest"
    if not pointer.is_file() or (pointer != path and any(path.glob("*.safetensors"))):
        return ""  # a folder with weights is a checkpoint, even with a `latest` file (DeepSpeed writes one)
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    target = pointer.parent / name
    what = "the run's pointer file" if pointer == path else "a run directory"
    if name and (target / "config.json").is_file():
        return f"{path} is {what}, not a checkpoint: pass the checkpoint it points to, {target}"
    if name and (target / "adapter_config.json").is_file():
        return (f"{path} is {what} of LoRA adapters, not a checkpoint: write the model with the adapters merged by "
                f"`gasungbi export-hf --merge-lora {path} OUT`")
    return f"{path} is {what}, not a checkpoint: pass one of its step_N checkpoint directories"


def require_checkpoint_dir(path) -> None:
    """A :class:`UserError` when ``path`` cannot be a checkpoint directory: it does not exist, it is a
    file, or it is a run directory or its ``latest`` file (:func:`run_dir_hint`). Commands call it
    before anything else about their checkpoint, so a typo in the path is what the error names."""
    from pathlib import Path

    if hint := run_dir_hint(path):
        raise UserError(hint)
    if not Path(path).exists():
        raise UserError(f"checkpoint directory {path} does not exist")
    if not Path(path).is_dir():
        raise UserError(f"{path} is a file, not a checkpoint directory")
