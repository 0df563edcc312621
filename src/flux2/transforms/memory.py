"""Peak memory per pipeline stage, recorded by a stage hook.

What a number means depends on the device (`MemoryReport.source` says which):

- "cuda_allocated": the most bytes held by tensors on the pipeline's CUDA device during the stage
  (torch.cuda.max_memory_allocated, its peak reset as the stage starts). Weights already resident count; the
  allocator's cached but unused blocks (memory_reserved) do not.
- "cpu_rss": the process's peak resident set during the stage: Linux's high-water mark VmHWM, reset as the
  stage starts by writing 5 to /proc/self/clear_refs. Everything in the process counts: weights, the Python
  heap, other threads' work.
- "cpu_rss_lifetime": where that mark cannot be reset (not Linux), resource's ru_maxrss, the process's peak
  since it started, read as the stage ends: an upper bound.

A stage that runs several times (one "sample" per image) reports its largest peak; stages may nest.

    report = memory_report(pipe)
    pipe.generate("a fox")
    print(report.format())  # encode_text 812.0 MiB / sample 1.9 GiB
    report.remove()
"""

import re
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

PROC_STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # clear_refs value that resets VmHWM (Documentation/filesystems/proc.rst)
MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB elsewhere


class MemoryReport:
    """A pipeline stage hook; `stages` maps each stage seen to its peak in bytes."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.source = "cuda_allocated" if self.device.type == "cuda" else _cpu_source()
        self.stages: dict[str, int] = {}
        self._open: dict[str, int] = {}  # running peak of each stage under way, outermost first
        self._hooks: list | None = None

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._fold()  # an enclosing stage keeps its peak so far before the counter restarts
        self._reset()
        self._open[stage] = 0
        try:
            yield
        finally:
            self._fold()
            self.stages[stage] = max(self.stages.get(stage, 0), self._open.pop(stage))

    def format(self) -> str:
        return "\n".join(f"{stage:<16}{_human(peak)}" for stage, peak in self.stages.items())

    def remove(self) -> None:
        """Stop recording: leave the pipeline's stage hooks as they were."""
        if self._hooks is not None and self in self._hooks:
            self._hooks.remove(self)
        self._hooks = None

    def _fold(self) -> None:
        if self._open:
            peak = self._peak()
            self._open = {stage: max(so_far, peak) for stage, so_far in self._open.items()}

    def _reset(self) -> None:
        if self.source == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "cpu_rss":
            CLEAR_REFS.write_text(RESET_PEAK_RSS)

    def _peak(self) -> int:
        if self.source == "cuda_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self.source == "cpu_rss":
            return _peak_rss()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * MAXRSS_UNIT


def memory_report(pipe) -> MemoryReport:
    """Record the peak memory of every stage `pipe` runs from now on (on the pipeline's device)."""
    report = MemoryReport(pipe.device)
    pipe.stage_hooks.append(report)
    report._hooks = pipe.stage_hooks
    return report


def _cpu_source() -> str:
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
        _peak_rss()
    except (OSError, ValueError):
        return "cpu_rss_lifetime"
    return "cpu_rss"


def _peak_rss() -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"no VmHWM line in {PROC_STATUS}")
    return int(match.group(1)) * 1024


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
