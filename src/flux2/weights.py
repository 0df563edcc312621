"""Finding a model's weights: environment variables, then a weights folder, then the Hugging Face cache/Hub.

A weights folder may be laid out like the studio app's (`flux-2-klein-9b.safetensors`, `ae.safetensors`,
optional `vae/`, `text_encoder/`, `tokenizer/` side by side) or like a diffusers model repository
(`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`); both work as they are.
"""

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flux2.registry import PUBLISHED_TEXT_ENCODERS, ModelInfo, TextEncoderInfo

WEIGHTS_DIR_ENV = "FLUX2_WEIGHTS_DIR"
AE_ENV = "AE_MODEL_PATH"
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]
# transformers-format shards only: Mistral repos also hold a `consolidated.safetensors` copy of the same weights.
TEXT_ENCODER_PATTERNS = [*TOKENIZER_PATTERNS, "model*.safetensors"]


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found locally and they could not be downloaded; the message says what to set."""

    def __init__(self, message: str, reason: str = "", what: str = "", env_var: str = "", repo_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # why it was not found, without the advice
        self.what, self.env_var, self.repo_id = what, env_var, repo_id  # the part, its variable, its Hub repo

    def with_reason(self, reason: str) -> "WeightsNotFoundError":
        """The same missing part with another reason (an error about a variable's bad path stays as it is)."""
        return _not_found(self.what, self.env_var, self.repo_id, reason) if self.env_var else self


class WeightsDownloadError(OSError):
    """A download from the Hugging Face Hub failed; the message names the repository and what to do."""


ALL_PARTS = ("transformer", "ae", "text_encoder")  # what can be asked for; text_encoder brings its tokenizer
PARTS = ("transformer", "ae", "text_encoder", "tokenizer")  # what is found, one path each (WeightPaths' fields)


@dataclass(frozen=True)
class WeightPaths:
    """Where each part lives; None for a part that was not asked for."""

    transformer: Path | None  # a .safetensors file (original layout) or a diffusers `transformer/` folder
    ae: Path | None  # `ae.safetensors` or a diffusers `vae/` folder
    text_encoder: Path | None
    tokenizer: Path | None


def weights_dir_from_env() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value) if value else None


def _env_path(var: str) -> Path | None:
    if not var or not os.environ.get(var):
        return None
    path = Path(os.environ[var]).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"{var} is set to {path}, which does not exist")
    return path


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _is_folder_with(path: Path, pattern: str) -> bool:
    return path.is_dir() and any(path.glob(pattern))


def find_transformer(info: ModelInfo, weights_dir: Path | None, download: bool = True) -> Path:
    if (path := _env_path(info.env_var)) is not None:
        return path
    if weights_dir is not None:
        found = _first_existing(weights_dir / info.filename, weights_dir / "transformer")
        if found is not None:
            return found
    what = f"the {info.name} transformer ({info.filename} or transformer/)"
    return _hub_file(info.repo_id, info.filename, download, what, info.env_var)


def find_ae(info: ModelInfo, weights_dir: Path | None, download: bool = True) -> Path:
    if (path := _env_path(AE_ENV)) is not None:
        return path
    if weights_dir is not None:
        found = _first_existing(weights_dir / info.filename_ae)
        if found is None and _is_folder_with(weights_dir / "vae", "*.safetensors"):
            found = weights_dir / "vae"
        if found is not None:
            return found
    return _hub_file(
        info.ae_repo_id, info.filename_ae, download, f"the autoencoder ({info.filename_ae} or vae/)", AE_ENV
    )


def find_text_encoder(enc: TextEncoderInfo, weights_dir: Path | None, download: bool = True) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of the text encoder."""
    _env_path(enc.tokenizer_env_var)  # a bad tokenizer variable fails before the weights are downloaded
    model = find_text_encoder_model(enc, weights_dir, download)
    return model, find_tokenizer(enc, weights_dir, download, model)


def find_text_encoder_model(enc: TextEncoderInfo, weights_dir: Path | None, download: bool = True) -> Path:
    """The text encoder's weights folder (transformers layout). A weights folder's `text_encoder/` serves only a
    model whose encoder it can be (see `_other_models_encoder`)."""
    if (path := _env_path(enc.env_var)) is not None:
        return path
    folder, foreign = weights_dir / "text_encoder" if weights_dir is not None else None, ""
    if folder is not None and _is_folder_with(folder, "*.json"):
        if not (foreign := _other_models_encoder(folder, enc)):
            return folder
    what = f"the text encoder {enc.repo_id} (text_encoder/)"
    try:
        return _hub_snapshot(enc.repo_id, TEXT_ENCODER_PATTERNS, download, what, enc.env_var)
    except WeightsNotFoundError as err:
        if foreign:
            raise _not_found(what, enc.env_var, enc.repo_id, f"{foreign}, and {err.reason}") from err
        raise


def _other_models_encoder(folder: Path, enc: TextEncoderInfo) -> str:
    """Why `folder` holds another model's text encoder ("" when it may be this one's): its config's model type,
    or a published model's hidden size that is not this encoder's. (Test stand-ins have other sizes: they pass.)"""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    kind = config.get("model_type")
    if kind in {known.kind for known in PUBLISHED_TEXT_ENCODERS} and kind != enc.kind:
        return f"{folder} holds a {kind} text encoder, not {enc.kind}"
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    published = {known.hidden_size for known in PUBLISHED_TEXT_ENCODERS}
    if enc.hidden_size and hidden in published and hidden != enc.hidden_size:
        return f"{folder} holds a text encoder of width {hidden}, not {enc.repo_id}'s {enc.hidden_size}"
    return ""


def find_tokenizer(
    enc: TextEncoderInfo, weights_dir: Path | None, download: bool = True, model: Path | None = None
) -> Path:
    """The tokenizer folder; the text encoder's folder `model` serves when it comes from the same repo."""
    if (path := _env_path(enc.tokenizer_env_var)) is not None:
        return path
    if weights_dir is not None and _is_folder_with(weights_dir / "tokenizer", "*"):
        return weights_dir / "tokenizer"
    if model is not None and _is_folder_with(model, "tokenizer*") and enc.tokenizer_repo_id == enc.repo_id:
        return model
    what = f"the tokenizer {enc.tokenizer_repo_id} (tokenizer/)"
    return _hub_snapshot(enc.tokenizer_repo_id, TOKENIZER_PATTERNS, download, what, enc.tokenizer_env_var)


def _refuse_random(info: ModelInfo, what: str) -> None:
    """A model built from random weights has nothing on disk: asking for its files is a caller's mistake."""
    if not info.needs_files:
        raise ValueError(f"the {info.name} model {what}: it is built from random weights")


def resolve_weights_dir(weights_dir: Path | str | None) -> Path | None:
    """The weights folder given, else $FLUX2_WEIGHTS_DIR; one that does not exist is an error, not ignored."""
    folder = Path(weights_dir).expanduser() if weights_dir is not None else weights_dir_from_env()
    if folder is not None and not folder.is_dir():
        source = "--weights-dir" if weights_dir is not None else WEIGHTS_DIR_ENV
        raise WeightsNotFoundError(f"weights folder {folder} ({source}) does not exist")
    return folder


def find_weights(
    info: ModelInfo, weights_dir: Path | str | None = None, download: bool = True, parts: tuple[str, ...] = ALL_PARTS
) -> WeightPaths:
    """Resolve every component of a model, in the documented order.

    Everything is first looked up locally; only then are the missing parts downloaded, transformer first
    (the gated repos), so nothing large is fetched before an unavailable part is known. Every part that cannot
    be found is named in one error.
    """
    _refuse_random(info, "has no weight files")
    folder = resolve_weights_dir(weights_dir)
    finders = {
        "transformer": lambda dl: find_transformer(info, folder, dl),
        "ae": lambda dl: find_ae(info, folder, dl),
        "text_encoder": lambda dl: find_text_encoder(info.text_encoder, folder, dl),
    }
    finders = {part: finders[part] for part in parts}
    found, errors = {}, {}
    for allow_download in [False, True] if download else [False]:
        if allow_download and (offline := _hub_out_of_reach(info, list(errors))):
            errors = {part: err.with_reason(f"not in the local Hugging Face cache, and {offline}")
                      for part, err in errors.items()}  # fmt: skip
            break
        for part in [p for p in finders if p not in found]:
            try:
                found[part] = finders[part](allow_download)
                errors.pop(part, None)
            except WeightsNotFoundError as err:
                errors[part] = err
    if errors:
        raise _missing_weights(info, list(errors.values()))
    text_encoder, tokenizer = found.get("text_encoder", (None, None))
    return WeightPaths(found.get("transformer"), found.get("ae"), text_encoder, tokenizer)


# ----------------------------------------------------------------------------- what is here, and fetching it


@dataclass(frozen=True)
class LocalPart:
    """One part of a model as found on this machine: its path, or why it is missing."""

    path: Path | None
    missing: str = ""  # the reason, when path is None

    @property
    def present(self) -> bool:
        return self.path is not None


def local_parts(info: ModelInfo, weights_dir: Path | None) -> dict[str, LocalPart]:
    """Each of PARTS looked up as find_weights does (variables, weights folder, Hugging Face cache), never fetching.

    `weights_dir` is used as given (see resolve_weights_dir). A part that is missing, or whose variable names a
    path that does not exist, is reported with the reason rather than raised.
    """
    _refuse_random(info, "has no weight files")
    enc = info.text_encoder
    found = {
        "transformer": _look_up(lambda: find_transformer(info, weights_dir, download=False)),
        "ae": _look_up(lambda: find_ae(info, weights_dir, download=False)),
        "text_encoder": _look_up(lambda: find_text_encoder_model(enc, weights_dir, download=False)),
    }
    model = found["text_encoder"].path
    found["tokenizer"] = _look_up(lambda: find_tokenizer(enc, weights_dir, download=False, model=model))
    return found


def _look_up(find: Callable[[], Path]) -> LocalPart:
    try:
        return LocalPart(find())
    except WeightsNotFoundError as err:
        return LocalPart(None, err.reason)


def disk_size(path: Path) -> int:
    """Bytes a file, or every file under a folder, takes; the Hugging Face cache's symlinks count as their blobs."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    blobs = {(st.st_dev, st.st_ino): st.st_size for st in (f.stat() for f in files)}  # a blob linked twice counts once
    return sum(blobs.values())


@dataclass(frozen=True)
class HubSource:
    """Where one part lives on the Hugging Face Hub: a single file, or the files of a repo matching `patterns`."""

    repo_id: str
    env_var: str  # what to set instead, when the Hub is out of reach
    filename: str = ""
    patterns: tuple[str, ...] = ()

    def fetch(self) -> Path:
        """Download into the Hugging Face cache (huggingface_hub shows the progress and retries broken transfers)."""
        from huggingface_hub import hf_hub_download, snapshot_download

        if self.filename:
            return Path(hf_hub_download(self.repo_id, self.filename))
        return Path(snapshot_download(self.repo_id, allow_patterns=list(self.patterns)))

    def check_access(self) -> None:
        """One small request: raises as the download would if the Hub is out of reach or the repo is closed."""
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

        if self.filename:
            get_hf_file_metadata(hf_hub_url(self.repo_id, self.filename))
        else:
            HfApi().repo_info(self.repo_id)


def hub_sources(info: ModelInfo) -> dict[str, HubSource]:
    """The Hub origin of each of PARTS."""
    enc = info.text_encoder
    return {
        "transformer": HubSource(info.repo_id, info.env_var, filename=info.filename),
        "ae": HubSource(info.ae_repo_id, AE_ENV, filename=info.filename_ae),
        "text_encoder": HubSource(enc.repo_id, enc.env_var, patterns=tuple(TEXT_ENCODER_PATTERNS)),
        "tokenizer": HubSource(enc.tokenizer_repo_id, enc.tokenizer_env_var, patterns=tuple(TOKENIZER_PATTERNS)),
    }


def download_weights(
    info: ModelInfo, parts: Sequence[str] = ALL_PARTS, weights_dir: Path | str | None = None
) -> WeightPaths:
    """Fetch into the Hugging Face cache the asked-for parts that are not on this machine; where each part now is.

    Parts found locally (variables, weights folder, cache) are not fetched again. Every repository to fetch from
    is checked first, so nothing large is downloaded before an unreachable Hub or a closed repo is known.
    Failures raise WeightsDownloadError naming the repository and what to do.
    """
    _refuse_random(info, "needs no download")
    wanted = parts_wanted(parts)
    folder = resolve_weights_dir(weights_dir)
    here = local_parts(info, folder)
    sources = hub_sources(info)
    _check_access([sources[part] for part in wanted if not here[part].present])
    paths: dict[str, Path] = {}
    for part in wanted:
        if part == "tokenizer" and not here[part].present:
            here = local_parts(info, folder)  # the text encoder's snapshot may have brought the tokenizer with it
        paths[part] = here[part].path or _fetch(sources[part])
    return WeightPaths(**{part: paths.get(part) for part in PARTS})


def parts_wanted(parts: Sequence[str]) -> list[str]:
    """The PARTS that `parts` (names from ALL_PARTS) stand for, in order: text_encoder brings its tokenizer."""
    unknown = [part for part in parts if part not in ALL_PARTS]
    if unknown or not parts:
        given = f"unknown {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise ValueError(f"parts: {given}; choose from {', '.join(ALL_PARTS)}")
    return [part for part in PARTS if part in parts or (part == "tokenizer" and "text_encoder" in parts)]


def _check_access(sources: list[HubSource]) -> None:
    from huggingface_hub import constants

    if sources and constants.HF_HUB_OFFLINE:
        repos = ", ".join(dict.fromkeys(source.repo_id for source in sources))
        raise WeightsDownloadError(f"HF_HUB_OFFLINE is set, so {repos} cannot be downloaded: unset it and retry")
    problems, checked = [], set()
    for source in sources:
        if source.repo_id in checked:
            continue
        checked.add(source.repo_id)
        try:
            source.check_access()
        except Exception as err:
            problems.append(_download_problem(source, err))
            if hub_unreachable(err):  # the other repos would only say the same
                break
    if problems:
        raise WeightsDownloadError("; ".join(problems))


def _fetch(source: HubSource) -> Path:
    try:
        return source.fetch()
    except Exception as err:
        raise WeightsDownloadError(_download_problem(source, err)) from err


def _download_problem(source: HubSource, err: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    repo, page = source.repo_id, f"{constants.ENDPOINT}/{source.repo_id}"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, GatedRepoError):
        return f"{repo} is gated: accept its licence at {page}, then log in with `hf auth login`"
    if isinstance(err, RepositoryNotFoundError) or status in (401, 403):
        return (
            f"{repo} was not found or needs a login: log in with `hf auth login` "
            f"(for a gated repo, also accept its licence at {page})"
        )
    if hub_unreachable(err):
        return (
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {repo}: check the network, "
            f"or set HF_ENDPOINT (a mirror) or HTTPS_PROXY; offline, copy the files to this machine and set "
            f"{source.env_var} (or {WEIGHTS_DIR_ENV})"
        )
    if isinstance(err, EntryNotFoundError):
        return f"{repo} has no file {source.filename}"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"downloading {repo} failed: {type(err).__name__}: {detail}"


def hub_unreachable(err: Exception) -> bool:
    """No answer from the Hub (network, proxy, timeout, offline mode) or a server-side failure."""
    # By class name: huggingface_hub's HTTP client (requests, httpx, httpx2) depends on its version.
    names = {cls.__name__ for cls in type(err).__mro__}
    no_answer = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "LocalEntryNotFoundError"}
    status = getattr(getattr(err, "response", None), "status_code", None) or 0
    return bool(names & no_answer) or status >= 500


def _hub_out_of_reach(info: ModelInfo, parts: list[str]) -> str:
    """Why nothing can be downloaded ("" when the Hub answers): one quick request before the real downloads,
    whose retries against a Hub out of reach take about a minute."""
    from huggingface_hub import constants

    if not parts:
        return ""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        hub_sources(info)[parts[0]].check_access()
    except Exception as err:
        if hub_unreachable(err):
            return f"the Hugging Face Hub at {constants.ENDPOINT} is not reachable"
    return ""


def _missing_weights(info: ModelInfo, errors: list[WeightsNotFoundError]) -> WeightsNotFoundError:
    """One line for everything missing: each part, why, and the variable that would point at it."""
    reasons = {err.reason for err in errors}
    shared = f" ({reasons.pop()})" if len(reasons) == 1 and all(err.env_var for err in errors) else ""
    parts = "; ".join(
        (f"{err.what}: set {err.env_var}" if shared else f"{err.what} ({err.reason}): set {err.env_var}")
        if err.env_var
        else str(err)
        for err in errors
    )
    return WeightsNotFoundError(
        f"missing weights for {info.name}{shared}: {parts}. Or set {WEIGHTS_DIR_ENV} (--weights-dir) to a folder "
        f"that holds them, or run `flux2 download {info.name}` where the Hugging Face Hub is reachable."
    )


def _not_found(what: str, env_var: str, repo_id: str, reason: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"could not find {what}: {reason}. Set {env_var} to its path, or {WEIGHTS_DIR_ENV} (or --weights-dir) "
        f"to a folder that holds it, or download the Hugging Face Hub repo {repo_id} "
        f"(`hf download {repo_id}`, or run once with network access).",
        reason=reason,
        what=what,
        env_var=env_var,
        repo_id=repo_id,
    )


def _hub_file(repo_id: str, filename: str, download: bool, what: str, env_var: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=not download))
    except Exception as err:  # offline, gated, missing: all become one clear message
        raise _not_found(what, env_var, repo_id, _reason(err, download)) from err


def _hub_snapshot(repo_id: str, patterns: list[str], download: bool, what: str, env_var: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except Exception as err:
        raise _not_found(what, env_var, repo_id, _reason(err, download)) from err


def _reason(err: Exception, download: bool) -> str:
    name = type(err).__name__
    if "IncompleteSnapshot" in name:
        return "only partly in the local Hugging Face cache (an interrupted download)"
    if not download and "LocalEntryNotFound" in name:  # only the cache was searched
        return "not in the local Hugging Face cache"
    if "LocalEntryNotFound" in name or "Offline" in name or "Connect" in name:
        return "not in the local Hugging Face cache and the Hub is not reachable"
    if "Gated" in name:
        return "the Hub repository is gated: accept its licence on the Hub and log in with `hf auth login`"
    return f"{name}: {str(err).splitlines()[0] if str(err) else ''}".strip()


# ----------------------------------------------------------------------------- a weights file that cannot be read


def unreadable_advice(path: Path) -> str:
    """What to do about a weights file that exists but cannot be read: fetch it again, or fix what pointed at it
    (the variable set to it, --weights-dir / $FLUX2_WEIGHTS_DIR, or the Hugging Face cache)."""
    model = _model_of_file(path)
    origin = _origin(path)
    if origin == HUB_CACHE:
        blob = Path(path).resolve()
        also = f" (and {blob})" if blob != Path(path).absolute() else ""
        return f"delete it{also} from the Hugging Face cache, then run `flux2 download {model}`"
    return f"re-download with `flux2 download {model}` or fix {origin}"


HUB_CACHE = "the Hugging Face cache"


def _origin(path: Path) -> str:
    """Where `path` came from, as a user would fix it."""
    from huggingface_hub import constants

    from flux2.registry import FLUX2_MODEL_INFO

    variables = [AE_ENV] + [v for info in FLUX2_MODEL_INFO.values() for v in _variables_of(info)]
    for var in dict.fromkeys(variables):
        if os.environ.get(var) and _within(path, Path(os.environ[var]).expanduser()):
            return f"${var}"
    if (folder := weights_dir_from_env()) is not None and _within(path, folder):
        return f"${WEIGHTS_DIR_ENV}"
    if _within(path, Path(constants.HF_HUB_CACHE)):
        return HUB_CACHE
    return "--weights-dir (or the path you gave)"


def _variables_of(info: ModelInfo) -> list[str]:
    enc = info.text_encoder
    return [var for var in (info.env_var, enc.env_var, enc.tokenizer_env_var) if var]


def _model_of_file(path: Path) -> str:
    """The model whose transformer file this is (by its variable, its name, or its Hub repo in the cache); MODEL
    when unsure."""
    from flux2.registry import FLUX2_MODEL_INFO

    path = Path(path)
    models = [info for info in FLUX2_MODEL_INFO.values() if info.needs_files]
    if any(path.name == info.filename_ae for info in models):
        return "MODEL --parts ae"
    for info in models:
        named = path.name == info.filename or _cache_folder(info.repo_id) in path.absolute().parts
        if named or (os.environ.get(info.env_var) and _within(path, Path(os.environ[info.env_var]).expanduser())):
            return info.name
    return "MODEL"


def _cache_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _within(path: Path, root: Path) -> bool:
    """`path` is `root` or inside it, compared as given and with links followed."""
    pairs = [(Path(path).absolute(), root.absolute()), (Path(path).resolve(), root.resolve())]
    return any(p == r or r in p.parents for p, r in pairs)
