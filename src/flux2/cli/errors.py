"""One clear line for every failure a user can meet: what failed and what to do."""

import sys

VERBOSE_HINT = "run with --verbose for the full traceback"


def describe(err: BaseException) -> str:
    """The message shown for `err`; tracebacks are for --verbose only."""
    # An error raised before torch (or the safety checks) were ever imported cannot be one of theirs; importing
    # them here would cost seconds on a mistyped option.
    torch, safety = sys.modules.get("torch"), sys.modules.get("flux2.safety")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return (
            "out of GPU memory: try --cpu-offload, a smaller --width/--height, fewer --num-images, or a smaller model"
        )
    if safety is not None and isinstance(err, safety.ContentFlagged):
        return f"not generated: {err}"
    if isinstance(err, ValueError | OSError):  # our own messages already say what to do
        return _one_line(str(err)) or type(err).__name__
    return f"unexpected {type(err).__name__}: {_one_line(str(err))} ({VERBOSE_HINT})"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
