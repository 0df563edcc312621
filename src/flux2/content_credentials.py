"""C2PA Content Credentials: a signed manifest in every saved image saying that a generative model made it, and
reading manifests back (ours or any other tool's) with their validation state.

What a flux2 manifest states: a `c2pa.created` action with the IPTC digital source type
`trainedAlgorithmicMedia` (inpainting and outpainting, which keep the source's pixels outside the mask, are a
`c2pa.opened` of the source plus a `c2pa.edited` with `compositeWithTrainedAlgorithmicMedia`), flux2 and its
version as the software agent, the model and the run's settings (no prompt) in an `org.flux2.generation`
assertion, and as ingredients the source, mask and reference images by the sha256 of their RGB pixels, which is
what the generation record keeps of them.

Signing uses the certificate chain and key named by FLUX2_C2PA_CERT and FLUX2_C2PA_KEY. Without them, a local
root certificate and a signing certificate it issues are made once and kept in the config folder; validators
report such a manifest as intact but untrusted, since no trust list holds that root. FLUX2_C2PA=off writes no
manifest; FLUX2_C2PA=strict fails a save that cannot be signed instead of saving without a manifest.
"""

import datetime as dt
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flux2 import __version__

log = logging.getLogger(__name__)

CONFIG_DIR_ENV = "FLUX2_CONFIG_DIR"
MODE_ENV, CERT_ENV, KEY_ENV = "FLUX2_C2PA", "FLUX2_C2PA_CERT", "FLUX2_C2PA_KEY"
ALG_ENV, TSA_ENV = "FLUX2_C2PA_ALG", "FLUX2_C2PA_TSA_URL"
MODES = ("on", "off", "strict")
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"  # the IPTC vocabulary C2PA uses for source types
TRAINED = IPTC + "trainedAlgorithmicMedia"
COMPOSITE = IPTC + "compositeWithTrainedAlgorithmicMedia"
GENERATION_LABEL = "org.flux2.generation"
PIXEL_HASH_KEY = "org.flux2.pixel_sha256"  # in an ingredient's metadata: the record's hash of its RGB pixels
GENERATION_FIELDS = ("model", "mode", "seed", "num_steps", "guidance", "width", "height", "strength",
                     "true_cfg_scale", "watermark")  # fmt: skip
UNTRUSTED = "signingCredential.untrusted"

LOCAL_ORG = "flux2 local signing (self-signed)"  # the Organization of the local certificates: how info tells them
LOCAL_FOLDER = "c2pa"
LOCAL_CHAIN, LOCAL_KEY = "signer-chain.pem", "signer-key.pem"
LOCAL_YEARS = 10  # an image outlives its signing certificate's validity only with a timestamp authority
# Reading: no network. Remote manifests and certificate revocation are not fetched.
READ_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
# The SDK's automatic thumbnail adds a preview image of up to ~1 MB to every file; the image is its own preview.
SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}


# ---------------------------------------------------------------------------------------------- settings


def config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """flux2's config folder: $FLUX2_CONFIG_DIR, else the platform's user config folder (as platformdirs has it)."""
    if environ.get(CONFIG_DIR_ENV):
        return Path(environ[CONFIG_DIR_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "flux2"


@dataclass(frozen=True)
class SigningSettings:
    """How images are signed. `cert` and `key` (PEM files) come together; without them the local credentials in
    `config_dir` sign. `algorithm` None: the one that fits the key."""

    mode: str = "on"
    cert: Path | None = None
    key: Path | None = None
    algorithm: str | None = None
    tsa_url: str | None = None
    config_dir: Path | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.algorithm is not None and self.algorithm not in ALGORITHMS:
            raise ValueError(f"{ALG_ENV} must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if (self.cert is None) != (self.key is None):
            given, missing = (CERT_ENV, KEY_ENV) if self.key is None else (KEY_ENV, CERT_ENV)
            raise ValueError(f"{given} is set but {missing} is not: set both (certificate chain and private key)")
        if self.tsa_url is not None and not self.tsa_url.startswith(("http://", "https://")):
            raise ValueError(f"{TSA_ENV} must be an http:// or https:// URL, got {self.tsa_url!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "SigningSettings":
        """The settings the FLUX2_C2PA* variables and FLUX2_CONFIG_DIR give; a ValueError names a bad variable."""
        path = {var: Path(environ[var]).expanduser() if environ.get(var) else None for var in (CERT_ENV, KEY_ENV)}
        return cls(
            mode=environ.get(MODE_ENV, "on").strip().lower() or "on",
            cert=path[CERT_ENV],
            key=path[KEY_ENV],
            algorithm=environ.get(ALG_ENV, "").strip().lower() or None,
            tsa_url=environ.get(TSA_ENV) or None,
            config_dir=config_dir(environ),
        )


@dataclass(frozen=True)
class Credentials:
    """What signs: the certificate chain (signing certificate first) and private key, as PEM."""

    chain: bytes
    key: bytes
    algorithm: str
    tsa_url: str | None = None


def check_signing(environ: Mapping[str, str] = os.environ) -> SigningSettings:
    """The signing settings, with the configured files loaded once: for a command to fail before a long run
    rather than at the save (where a bad configuration only costs the manifest, not the image)."""
    settings = SigningSettings.from_env(environ)
    if settings.mode != "off":
        load_credentials(settings)
    return settings


def load_credentials(settings: SigningSettings) -> Credentials:
    """The configured chain and key, checked to belong together; else the local ones (made on first use)."""
    if settings.cert is None:
        return local_credentials(settings.config_dir or config_dir())
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain = _read_pem(settings.cert, CERT_ENV)
    key_pem = _read_pem(settings.key, KEY_ENV)
    try:
        cert = x509.load_pem_x509_certificates(chain)[0]
    except ValueError:
        raise ValueError(f"{CERT_ENV}={settings.cert}: not a PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{KEY_ENV}={settings.key}: not an unencrypted PEM private key ({err})") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise ValueError(f"{KEY_ENV}={settings.key} is not the key of the first certificate in {CERT_ENV}")
    return Credentials(chain, key_pem, settings.algorithm or _algorithm_for(key, settings.key), settings.tsa_url)


def _read_pem(path: Path, variable: str) -> bytes:
    if not path.is_file():
        raise ValueError(f"{variable}={path}: no such file (it must name a PEM file)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"{variable}={path}: cannot be read ({err.strerror or err})") from None


def _algorithm_for(key, path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in curves:
        return curves[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"  # C2PA allows RSA only with PSS padding
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"{KEY_ENV}={path}: C2PA signs with EC P-256/384/521, RSA or Ed25519 keys, not this one")


# ---------------------------------------------------------------------------------------------- local credentials


def local_credentials(folder: Path) -> Credentials:
    """The local signing certificate and key under folder/c2pa, made there when missing or expired."""
    store = folder / LOCAL_FOLDER
    if not _usable(store):
        _create_local(store)
    return Credentials((store / LOCAL_CHAIN).read_bytes(), (store / LOCAL_KEY).read_bytes(), "es256")


def _usable(store: Path) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificates((store / LOCAL_CHAIN).read_bytes())[0]
    except (OSError, ValueError):
        return False
    return (store / LOCAL_KEY).is_file() and cert.not_valid_after_utc > dt.datetime.now(dt.UTC)


def _create_local(store: Path) -> None:
    """A root certificate and a signing certificate it issues (validators reject a self-signed signing
    certificate). The root's key is not kept: nothing else can ever be issued in its name."""
    store.parent.mkdir(parents=True, exist_ok=True)
    chain, key = _local_chain()
    staging = Path(tempfile.mkdtemp(prefix=".c2pa-", dir=store.parent))
    (staging / LOCAL_CHAIN).write_bytes(chain)
    (staging / LOCAL_KEY).write_bytes(key)
    os.chmod(staging / LOCAL_KEY, 0o600)
    try:
        staging.rename(store)  # fails when a (non-empty) set is there
    except OSError:
        if _usable(store):  # another process made them at the same moment: theirs are as good
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(store, ignore_errors=True)  # an expired or partial set
        staging.rename(store)


def _local_chain() -> tuple[bytes, bytes]:
    """(signing certificate + root certificate, signing key), as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _certificate(_name("flux2 local root"), _name("flux2 local root"), root_key.public_key(), root_key, ca=True)
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])  # one of the EKUs C2PA accepts
    signer = _certificate(_name("flux2 local signer"), root.subject, key.public_key(), root_key, ca=False, eku=usage)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return signer.public_bytes(pem) + root.public_bytes(pem), key_pem


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, LOCAL_ORG)])  # fmt: skip


def _certificate(subject, issuer, public_key, issuer_key, *, ca: bool, eku=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"), False)  # fmt: skip
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # a little slack for clocks that differ
        .not_valid_after(now + dt.timedelta(days=365 * LOCAL_YEARS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )  # fmt: skip
    if not ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if eku is not None:
        builder = builder.add_extension(eku, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


# ---------------------------------------------------------------------------------------------- writing


def manifest_for(record: dict, title: str, fmt: str) -> dict:
    """The manifest definition for an image the record describes (format: "PNG", "JPEG" or "WEBP")."""
    ingredients = _ingredients(record)
    return {
        "claim_generator_info": [_software_agent()],
        "title": title,
        "format": MIME[fmt],
        "ingredients": ingredients,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": _actions(record, [i["label"] for i in ingredients])}},
            {"label": GENERATION_LABEL, "data": {k: record[k] for k in GENERATION_FIELDS if record.get(k) is not None}},
        ],
    }


def _software_agent() -> dict:
    return {"name": "flux2", "version": __version__}


def _keeps_source(record: dict) -> bool:
    """Inpainting and outpainting keep the source's pixels outside the mask: an edit of it, not a new image."""
    return record.get("mode") in ("inpaint", "outpaint")


def _ingredients(record: dict) -> list[dict]:
    """The images the record names, by the sha256 of their RGB pixels (the record keeps no more of them)."""
    named = [("source", "source image", record.get("source"))]
    named.append(("mask", "mask", (record.get("edit") or {}).get("mask")))
    named += [(f"reference-{i}", f"reference image {i}", h) for i, h in enumerate(record.get("references") or [], 1)]
    return [
        {"title": title, "label": label, "description": f"sha256 of its RGB pixels: {digest}",
         "relationship": "parentOf" if label == "source" and _keeps_source(record) else "inputTo",
         "metadata": {PIXEL_HASH_KEY: digest}}
        for label, title, digest in named if digest
    ]  # fmt: skip


def _actions(record: dict, ingredient_ids: list[str]) -> list[dict]:
    model = record.get("model", "unknown")
    made = {"softwareAgent": _software_agent(), "description": f"generated with the FLUX.2 model {model}"}
    if not _keeps_source(record):
        inputs = {"parameters": {"ingredientIds": ingredient_ids}} if ingredient_ids else {}
        return [{"action": "c2pa.created", "digitalSourceType": TRAINED, **made, **inputs}]
    others = [i for i in ingredient_ids if i != "source"]
    edited = {"action": "c2pa.edited", "digitalSourceType": COMPOSITE, **made}
    if others:
        edited["parameters"] = {"ingredientIds": others}
    return [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["source"]}}, edited]


def sign_image(data: bytes, fmt: str, record: dict, title: str, credentials: Credentials) -> bytes:
    """The encoded image (PNG, JPEG or WEBP bytes) with a signed manifest embedded; raises on any failure."""
    import c2pa

    info = c2pa.C2paSignerInfo(credentials.algorithm, credentials.chain, credentials.key, credentials.tsa_url)
    signed = io.BytesIO()
    with (
        c2pa.Signer.from_info(info) as signer,
        c2pa.Context(settings=c2pa.Settings.from_dict(SIGN_SETTINGS)) as context,
        c2pa.Builder(manifest_for(record, title, fmt), context=context) as builder,
    ):
        builder.sign(signer, MIME[fmt], io.BytesIO(data), signed)
    return signed.getvalue()


def embed_credentials(
    data: bytes, fmt: str, record: dict, title: str, settings: SigningSettings | None = None
) -> bytes:
    """`sign_image` with the settings given (default: from the environment). A failure (no c2pa library, a bad
    certificate, a signing error) returns the image unsigned with a warning, or with mode "strict" raises."""
    strict = (settings.mode if settings else os.environ.get(MODE_ENV, "").strip().lower()) == "strict"
    try:
        settings = settings or SigningSettings.from_env()
        if settings.mode == "off":
            return data
        return sign_image(data, fmt, record, title, load_credentials(settings))
    except Exception as err:  # the image matters more than its credentials
        reason = _reason(err)
        if strict:
            raise ValueError(f"{title}: cannot add Content Credentials ({reason}); {MODE_ENV}=strict") from err
        log.warning("%s saved without Content Credentials: %s", title, reason)
        return data


def _reason(err: Exception) -> str:
    if isinstance(err, ImportError):
        return "the c2pa-python package is not installed (pip install c2pa-python)"
    return str(err) or type(err).__name__


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Ingredient:
    title: str | None
    relationship: str | None
    format: str | None = None
    sha256: str | None = None  # flux2's hash of its RGB pixels, when flux2 wrote it


@dataclass(frozen=True)
class Action:
    action: str
    digital_source_type: str | None = None
    software_agent: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class ContentCredentials:
    """An image's active C2PA manifest and its validation. `state`: "valid" (intact, signed by a trusted
    certificate), "untrusted" (intact and correctly signed, but no trust list holds the certificate), "invalid"
    (altered after signing, or a bad signature or manifest: `failures` says what)."""

    state: str
    verdict: str  # one line for people, e.g. "signed, untrusted (local self-signed flux2 certificate)"
    signer: str | None = None
    issuer: str | None = None
    algorithm: str | None = None
    signed_at: str | None = None
    claim_generator: str | None = None
    title: str | None = None
    actions: tuple[Action, ...] = ()
    assertions: tuple[str, ...] = ()
    ingredients: tuple[Ingredient, ...] = ()
    model: str | None = None
    failures: tuple[str, ...] = ()

    @property
    def local(self) -> bool:
        """Signed with flux2's local self-signed credentials (this computer's or another's)."""
        return self.issuer == LOCAL_ORG


def read_credentials(path: str | Path) -> ContentCredentials | None:
    """The image's manifest and its validation; None when it has none. Raises ImportError without c2pa-python."""
    import c2pa

    try:
        with (
            c2pa.Context(settings=c2pa.Settings.from_dict(READ_SETTINGS)) as context,
            c2pa.Reader(str(path), context=context) as reader,
        ):
            store = json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound:
        return None
    except c2pa.C2paError as err:
        return ContentCredentials("invalid", f"invalid: the manifest cannot be read ({err})", failures=(str(err),))
    manifest = store.get("manifests", {}).get(store.get("active_manifest"))
    if manifest is None:
        return ContentCredentials("invalid", "invalid: no active manifest", failures=("no active manifest",))
    return _credentials(store, manifest)


def _credentials(store: dict, manifest: dict) -> ContentCredentials:
    signature = manifest.get("signature_info") or {}
    assertions = manifest.get("assertions") or []
    generation = next((a.get("data") or {} for a in assertions if a.get("label") == GENERATION_LABEL), {})
    state, verdict, failures = _validation(store, signature.get("issuer"))
    return ContentCredentials(
        state=state, verdict=verdict, failures=failures,
        signer=signature.get("common_name"), issuer=signature.get("issuer"), algorithm=signature.get("alg"),
        signed_at=signature.get("time"), claim_generator=_generator(manifest), title=manifest.get("title"),
        actions=tuple(_action(action) for action in _listed_actions(assertions)),
        assertions=tuple(a.get("label", "") for a in assertions),
        ingredients=tuple(_ingredient(i) for i in manifest.get("ingredients") or []),
        model=generation.get("model"),
    )  # fmt: skip


def _validation(store: dict, issuer: str | None) -> tuple[str, str, tuple[str, ...]]:
    statuses = store.get("validation_status") or []  # the failures, as the SDK lists them
    failures = tuple(f"{s.get('code')}: {s.get('explanation', '')}".rstrip(": ") for s in statuses)
    broken = [f for s, f in zip(statuses, failures, strict=True) if s.get("code") != UNTRUSTED]
    if broken or store.get("validation_state") == "Invalid":
        return "invalid", "invalid: " + "; ".join(broken or ["the SDK reports the manifest invalid"]), failures
    if any(s.get("code") == UNTRUSTED for s in statuses):
        why = "local self-signed flux2 certificate" if issuer == LOCAL_ORG else "certificate not on a trust list"
        return "untrusted", f"signed, untrusted ({why})", failures
    return "valid", "signed, valid", failures


def _generator(manifest: dict) -> str | None:
    info = manifest.get("claim_generator_info") or []
    named = [" ".join(str(g[k]) for k in ("name", "version") if g.get(k)) for g in info if isinstance(g, dict)]
    return ", ".join(n for n in named if n) or manifest.get("claim_generator")


def _listed_actions(assertions: list[dict]) -> list[dict]:
    """The actions of every actions assertion (c2pa.actions, c2pa.actions.v2), in order."""
    found = [a.get("data") or {} for a in assertions if a.get("label", "").startswith("c2pa.actions")]
    return [action for data in found for action in data.get("actions", [])]


def _action(action: dict) -> Action:
    agent = action.get("softwareAgent")
    if isinstance(agent, dict):
        agent = " ".join(str(agent[k]) for k in ("name", "version") if agent.get(k))
    return Action(action.get("action", ""), action.get("digitalSourceType"), agent, action.get("description"))


def _ingredient(ingredient: dict) -> Ingredient:
    digest = (ingredient.get("metadata") or {}).get(PIXEL_HASH_KEY)
    return Ingredient(ingredient.get("title"), ingredient.get("relationship"), ingredient.get("format"), digest)
