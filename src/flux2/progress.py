"""Terminal progress bars (tqdm) fed by the pipeline's progress events."""

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from flux2.pipeline import Progress

STAGE_LABELS = {
    "load": "loading weights",
    "upsample": "upsampling prompt",
    "encode_text": "encoding prompt",
    "encode_references": "encoding references",
    "denoise": "denoising",
    "decode": "decoding",
}


class TerminalProgress:
    """One bar per stage (on stderr); each shows steps, elapsed time and rate, loading names the component."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.stage = ""

    def __enter__(self) -> "TerminalProgress":
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def __call__(self, event: "Progress") -> None:
        if not self.enabled:
            return
        if event.stage != self.stage or event.step == 0:
            self._close()
            self.stage = event.stage
            self.bar = tqdm(
                total=event.total,
                desc=STAGE_LABELS.get(event.stage, event.stage),
                unit="part" if event.stage == "load" else "step",
                leave=event.stage == "denoise",
            )
        self.bar.update(event.step - self.bar.n)
        if event.detail:
            self.bar.set_postfix_str(event.detail)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
