"""One clear line for every failure a user can meet: what failed and what to do."""

import sys

VERBOSE_HINT = "run with --verbose for the full traceback"


def describe(err: BaseException) -> str:
    """The message shown for `err`; tracebacks are for --verbose only."""
    from flux2.safety import ContentFlagged

    torch = sys.modules.get("torch")  # an error before torch was ever imported cannot be one of its own
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return (
            "out of GPU memory: try --cpu-offload, a smaller --width/--height, fewer --num-images, or a smaller model"
        )
    if isinstance(err, ContentFlagged):
        return f"not generated: {err}"
    if isinstance(err, ValueError | OSError):  # our own messages already say what to do
        return _one_line(str(err)) or type(err).__name__
    return f"unexpected {type(err).__name__}: {_one_line(str(err))} ({VERBOSE_HINT})"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
