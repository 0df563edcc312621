"""Peak memory per stage (flux2.transforms.memory) with the tiny pipeline on the CPU.

On Linux the CPU numbers are the process's peak resident set during each stage (VmHWM reset per stage); the
CUDA path (torch.cuda.max_memory_allocated) needs a GPU.
"""

import pytest
import torch

from flux2.pipeline import Flux2Pipeline
from flux2.transforms.memory import MemoryReport, memory_report

MIB = 1 << 20


@pytest.fixture(scope="module")
def pipe(one_thread):
    return Flux2Pipeline("tiny", device="cpu", watermark=None)


def test_every_stage_is_recorded_and_the_hook_comes_off(pipe):
    hooks = list(pipe.stage_hooks)
    report = memory_report(pipe)
    assert pipe.stage_hooks == [*hooks, report]
    pipe.generate("a fox", width=64, height=64, num_steps=2, seed=1)
    assert {"encode_text", "sample"} <= set(report.stages)
    assert all(isinstance(peak, int) and peak >= 0 for peak in report.stages.values())
    if report.source.startswith("cpu_rss"):
        assert all(peak > 10 * MIB for peak in report.stages.values())  # at least the interpreter and torch
    assert "sample" in report.format()

    report.remove()
    assert pipe.stage_hooks == hooks
    seen = dict(report.stages)
    pipe.generate("a fox", width=64, height=64, num_steps=2, seed=1)
    assert report.stages == seen  # no longer recording


def test_a_stage_peak_covers_what_it_allocated():
    report = MemoryReport(torch.device("cpu"))
    if report.source != "cpu_rss":
        pytest.skip(f"the peak resident set cannot be reset here ({report.source})")
    with report("outer"):
        with report("inner"):
            block = torch.ones(64 * MIB, dtype=torch.uint8)  # written, so resident
            del block
        with report("after"):
            pass
    assert report.stages["inner"] >= report.stages["after"] + 48 * MIB  # the mark was reset between them
    assert report.stages["outer"] >= report.stages["inner"]  # an enclosing stage keeps its inner peaks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_per_stage():
    report = MemoryReport(torch.device("cuda"))
    assert report.source == "cuda_allocated"
    with report("big"):
        block = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
        del block
    with report("small"):
        pass
    assert report.stages["big"] >= report.stages["small"] + 64 * MIB
