"""The models that options load besides the image model: the NSFW classifier (`--safety classifier|full`) and the
chat model (`--safety full`, `--upsample local`). Which ones a run needs, whether each is on this machine, and
fetching them (`flux2 download MODEL --safety ... --upsample ...`).

Checked before anything loads: a model that is neither a local folder nor in the Hugging Face cache, while the Hub
is out of reach, fails at once with what to do, instead of after the image model loaded and a minute of retries.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from flux2.registry import CHAT_MODEL, NSFW_CLASSIFIER, ModelInfo, SideModel
from flux2.weights import HubSource, WeightsNotFoundError, hub_unreachable


@dataclass(frozen=True)
class SideModelUse:
    """One side model a run needs: which, and the Hub id or folder it loads from."""

    model: SideModel
    source: str

    @property
    def name(self) -> str:
        return f"{self.model.label} {self.source}"


def side_models_needed(
    info: ModelInfo, safety: str = "off", upsample: str = "none", nsfw_model: str | None = None,
    upsample_model: str | None = None,
) -> list[SideModelUse]:  # fmt: skip
    """The side models these options load. On [dev] the loaded Mistral text encoder is also the chat model."""
    needed = []
    if safety in ("classifier", "full"):
        needed.append(SideModelUse(NSFW_CLASSIFIER, nsfw_model or NSFW_CLASSIFIER.repo_id))
    own_chat_model = info.text_encoder.kind == "mistral3"
    if upsample == "local" and (upsample_model or not own_chat_model):
        needed.append(SideModelUse(CHAT_MODEL, upsample_model or CHAT_MODEL.repo_id))
    if safety == "full" and not own_chat_model and CHAT_MODEL.repo_id not in {use.source for use in needed}:
        needed.append(SideModelUse(CHAT_MODEL, CHAT_MODEL.repo_id))
    return needed


def local_side_model(source: str) -> Path | None:
    """The folder `source` names, or its snapshot in the Hugging Face cache; None when it is in neither."""
    from huggingface_hub import snapshot_download

    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if not is_hub_id(source):
        return None
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached (or only partly): the caller decides what that means
        return None


def is_hub_id(source: str) -> bool:
    """ "owner/name", and not a path on this machine."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not Path(source).exists()


def check_side_models(needed: list[SideModelUse], fetch_command: str = "flux2 download MODEL") -> None:
    """Every side model is here or can be downloaded now; else one WeightsNotFoundError naming each and what to
    do (`fetch_command` fetches them). Costs one quick request to the Hub, only when something is not here."""
    missing = [use for use in needed if local_side_model(use.source) is None]
    for use in missing:
        if not is_hub_id(use.source):
            raise WeightsNotFoundError(f"{use.model.option} {use.source}: no such folder, and not a Hugging Face "
                                       f"Hub id (owner/name) either")  # fmt: skip
    if not missing:
        return
    reason = _why_not_downloadable(missing[0])
    if not reason:
        return  # the loaders will download what is missing
    items = "; ".join(f"{use.name} (point {use.model.option} at a folder that holds it)" for use in missing)
    raise WeightsNotFoundError(
        f"missing {items}: not on this machine, and {reason}. Run `{fetch_command}` where the Hub is reachable, "
        f"or turn the option off."
    )


def _why_not_downloadable(use: SideModelUse) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        HubSource(use.source, use.model.option).check_access()
    except Exception as err:
        if hub_unreachable(err):
            return f"the Hugging Face Hub at {constants.ENDPOINT} is not reachable"
        return f"{use.source} cannot be fetched from the Hub ({type(err).__name__})"
    return ""


def download_side_models(needed: list[SideModelUse]) -> dict[str, Path]:
    """Fetch into the Hugging Face cache each side model not here; where each one is."""
    found = {}
    for use in needed:
        path = local_side_model(use.source)
        if path is None:
            check_side_models([use], "flux2 download")
            path = HubSource(use.source, use.model.option, patterns=("*.json", "*.safetensors", "*.txt", "*.model",
                                                                     "*.jinja", "tokenizer*")).fetch()  # fmt: skip
        found[use.name] = path
    return found
