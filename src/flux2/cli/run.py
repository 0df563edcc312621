"""One generation run from the command line: progress bars, Ctrl-C cancels the run, images saved as they come."""

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flux2.cli.output import Target, save_or_rescue
from flux2.pipeline import Flux2Pipeline, GeneratedImage, GenerationCancelled
from flux2.progress import TerminalProgress
from flux2.request import GenerationRequest, request_params


@dataclass
class RunResult:
    outputs: list[GeneratedImage]
    paths: list[Path | None]  # None for an output the safety policy withheld
    cancelled: bool = False
    rescued: list[str] = field(default_factory=list)  # one line per image saved elsewhere than asked, and why


@contextmanager
def cancel_on_interrupt() -> Iterator[threading.Event]:
    """The first Ctrl-C asks the run to stop after the current step; a second one stops at once."""
    cancel = threading.Event()

    def on_interrupt(signum, frame) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\ncancelling after the current step (Ctrl-C again to stop at once)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def generate_and_save(
    pipe: Flux2Pipeline, target: Target, request: GenerationRequest, *, sidecar: bool, show_progress: bool,
    prompts: list[str] | None = None,
) -> RunResult:  # fmt: skip
    """Run `request` (or, with `prompts`, its settings for each prompt, batched where the run allows) and save
    every image it returns, including those finished before a cancellation."""
    cancelled = False
    settings = {name: getattr(request, name) for name in request_params() if name != "prompt"}
    with cancel_on_interrupt() as cancel, TerminalProgress(enabled=show_progress) as progress:
        try:
            if prompts is None:
                outputs = pipe.run(request, callback=progress, cancel=cancel)
            else:
                outputs = pipe.generate_many(prompts, callback=progress, cancel=cancel, **settings)
        except GenerationCancelled as stopped:
            outputs, cancelled = stopped.completed, True
    result = RunResult(outputs, [], cancelled)
    for out in outputs:
        result.paths.append(None if out.image is None else _save(out, target, sidecar, result.rescued))
    return result


def _save(out: GeneratedImage, target: Target, sidecar: bool, rescued: list[str]) -> Path:
    """Save one image; one that could not go where asked is saved elsewhere, and `rescued` says where and why."""
    saved = save_or_rescue(out.image, out.record.to_dict(), target, sidecar)
    if saved.problem:
        rescued.append(f"{saved.problem}: saved seed {out.record.seed} to {saved.path} instead")
    return saved.path
