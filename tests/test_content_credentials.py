"""C2PA Content Credentials in every saved image: validated by the c2pa SDK's own Reader, read back by
`flux2 info`, also for manifests another tool wrote."""

import datetime as dt
import io
import json
import os
import struct
import sys
import zlib

import c2pa
import numpy as np
import pytest
from command import flux2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from flux2.content_credentials import (
    CERT_ENV,
    KEY_ENV,
    MODE_ENV,
    SigningSettings,
    check_signing,
    read_credentials,
)
from flux2.provenance import read_provenance, save_with_provenance

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
CAPTURE = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"
RECORD = {"model": "flux.2-klein-4b", "prompt": "a lighthouse", "seed": 42, "num_steps": 4, "guidance": 1.0,
          "width": 80, "height": 64, "references": ["ab" * 32], "mode": "generate"}  # fmt: skip
SOURCE, MASK = "cd" * 32, "ef" * 32


@pytest.fixture(autouse=True)
def config(tmp_path, monkeypatch):
    """A config folder of the test's own, and none of the signing variables set."""
    for var in (MODE_ENV, CERT_ENV, KEY_ENV, "FLUX2_C2PA_ALG", "FLUX2_C2PA_TSA_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLUX2_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


@pytest.fixture
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))


def sdk_read(path) -> dict:
    """The manifest store as the c2pa SDK reports it (its validation, not ours)."""
    with c2pa.Reader(str(path)) as reader:
        return json.loads(reader.json())


def active(store: dict) -> dict:
    return store["manifests"][store["active_manifest"]]


def assertion(manifest: dict, label: str) -> dict:
    return next(a["data"] for a in manifest["assertions"] if a["label"] == label)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_saved_image_carries_a_manifest_the_sdk_validates(image, tmp_path, suffix):
    path = save_with_provenance(image, tmp_path / f"out{suffix}", RECORD)
    store = sdk_read(path)
    # Intact and correctly signed; untrusted only because no trust list holds the local root.
    assert store["validation_state"] == "Valid"
    assert [s["code"] for s in store["validation_status"]] == ["signingCredential.untrusted"]
    passed = {s["code"] for s in store["validation_results"]["activeManifest"]["success"]}
    assert {"claimSignature.validated", "assertion.dataHash.match"} <= passed
    manifest = active(store)
    [created] = assertion(manifest, "c2pa.actions.v2")["actions"]
    assert created["action"] == "c2pa.created" and created["digitalSourceType"] == TRAINED
    assert created["softwareAgent"]["name"] == "flux2"
    assert assertion(manifest, "org.flux2.generation")["model"] == "flux.2-klein-4b"
    assert "prompt" not in assertion(manifest, "org.flux2.generation")  # the signed claim leaves the prompt out
    assert read_provenance(path)["seed"] == 42  # the existing metadata is kept beside the manifest
    if suffix == ".png":  # lossless: signing leaves the pixels alone
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_our_reader_reports_the_local_certificate_honestly(image, tmp_path, config):
    first = read_credentials(save_with_provenance(image, tmp_path / "a.png", RECORD))
    second = read_credentials(save_with_provenance(image, tmp_path / "b.jpg", RECORD))
    assert first.state == second.state == "untrusted" and first.local
    assert first.verdict == "signed, untrusted (local self-signed flux2 certificate)"
    assert first.model == "flux.2-klein-4b" and first.claim_generator.startswith("flux2 ")
    assert [(a.action, a.digital_source_type) for a in first.actions] == [("c2pa.created", TRAINED)]
    assert oct((config / "c2pa" / "signer-key.pem").stat().st_mode & 0o777) == "0o600"
    assert first.signer == second.signer == "flux2 local signer"  # made once, then reused


def test_edits_list_their_ingredients_by_hash(image, tmp_path):
    inpaint = dict(RECORD, mode="inpaint", source=SOURCE, edit={"mask": MASK, "mask_blur": 4})
    found = read_credentials(save_with_provenance(image, tmp_path / "inpaint.png", inpaint))
    assert [(i.title, i.relationship, i.sha256) for i in found.ingredients] == [
        ("source image", "parentOf", SOURCE), ("mask", "inputTo", MASK), ("reference image 1", "inputTo", "ab" * 32),
    ]  # fmt: skip
    # Inpainting keeps the source outside the mask: an edit of it, not a new creation.
    assert [(a.action, a.digital_source_type) for a in found.actions] == [
        ("c2pa.opened", None), ("c2pa.edited", COMPOSITE),
    ]  # fmt: skip
    img2img = read_credentials(save_with_provenance(image, tmp_path / "i2i.jpg", dict(RECORD, mode="img2img",
                                                                                      source=SOURCE)))  # fmt: skip
    assert [(i.relationship, i.sha256) for i in img2img.ingredients] == [("inputTo", SOURCE), ("inputTo", "ab" * 32)]
    assert [a.action for a in img2img.actions] == ["c2pa.created"] and img2img.state == "untrusted"
    plain = read_credentials(save_with_provenance(image, tmp_path / "t2i.png", dict(RECORD, references=[])))
    assert plain.ingredients == ()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(c)) + k + c + struct.pack(">I", zlib.crc32(k + c)) for k, c in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def test_pixels_changed_after_signing_fail_validation(image, tmp_path):
    path = save_with_provenance(image, tmp_path / "signed.png", RECORD)
    assert read_credentials(path).state == "untrusted"  # negative control: untouched, it validates
    other = io.BytesIO()
    Image.fromarray(255 - np.asarray(image)).save(other, format="PNG")  # same size, other pixels
    new_pixels = [c for c in png_chunks(other.getvalue()) if c[0] == b"IDAT"]
    chunks = png_chunks(path.read_bytes())
    at = next(i for i, c in enumerate(chunks) if c[0] == b"IDAT")
    tampered = chunks[:at] + new_pixels + [c for c in chunks[at:] if c[0] != b"IDAT"]
    (tmp_path / "tampered.png").write_bytes(png_from_chunks(tampered))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "tampered.png")), np.asarray(image))
    found = read_credentials(tmp_path / "tampered.png")
    assert found.state == "invalid" and "assertion.dataHash.mismatch" in found.verdict
    assert sdk_read(tmp_path / "tampered.png")["validation_state"] == "Invalid"


def test_a_jpeg_changed_after_signing_fails_validation(image, tmp_path):
    path = save_with_provenance(image, tmp_path / "signed.jpg", RECORD)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a byte of the compressed pixels, just before the end-of-image marker
    path.write_bytes(bytes(data))
    assert read_credentials(path).state == "invalid"


def certificate_chain(folder, organization: str, key) -> tuple:
    """A root and a signing certificate it issues, as a certificate authority would make them; (chain, key) files."""
    now = dt.datetime.now(dt.UTC)

    def issue(subject, issuer, public_key, signing_key, ca: bool):
        usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                               "encipher_only", "decipher_only"), False)  # fmt: skip
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), False)
        )  # fmt: skip
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        return builder.sign(signing_key, hashes.SHA256())

    def name(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])  # fmt: skip

    root_key = ec.generate_private_key(ec.SECP256R1())
    root = issue(name(f"{organization} Root"), name(f"{organization} Root"), root_key.public_key(), root_key, True)
    signer = issue(name(f"{organization} Signer"), root.subject, key.public_key(), root_key, False)
    pem = serialization.Encoding.PEM
    (folder / "chain.pem").write_bytes(signer.public_bytes(pem) + root.public_bytes(pem))
    (folder / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "chain.pem", folder / "key.pem"


def test_a_configured_certificate_signs(image, tmp_path, monkeypatch, config):
    cert, key = certificate_chain(tmp_path, "Example Studio", rsa.generate_private_key(65537, 2048))
    monkeypatch.setenv(CERT_ENV, str(cert))
    monkeypatch.setenv(KEY_ENV, str(key))
    found = read_credentials(save_with_provenance(image, tmp_path / "out.jpg", RECORD))
    assert (found.signer, found.issuer, found.algorithm) == ("Example Studio Signer", "Example Studio", "Ps256")
    assert found.state == "untrusted" and not found.local
    assert found.verdict == "signed, untrusted (certificate not on a trust list)"
    assert not (config / "c2pa").exists()  # no local credentials were made


def test_a_missing_key_file_is_an_error_naming_the_variable(image, tmp_path, monkeypatch, caplog):
    cert, _ = certificate_chain(tmp_path, "Example Studio", ec.generate_private_key(ec.SECP256R1()))
    monkeypatch.setenv(CERT_ENV, str(cert))
    with pytest.raises(ValueError, match=f"{KEY_ENV} is set but {CERT_ENV} is not|{CERT_ENV} is set but {KEY_ENV}"):
        check_signing()
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "gone.pem"))
    with pytest.raises(ValueError, match=f"{KEY_ENV}=.*gone.pem: no such file"):
        check_signing()
    # Saving never loses the image for it: it is written without a manifest, and a warning says why...
    path = save_with_provenance(image, tmp_path / "out.png", RECORD)
    assert read_credentials(path) is None and read_provenance(path)["seed"] == 42
    assert f"out.png saved without Content Credentials: {KEY_ENV}=" in caplog.text
    # ...unless the user asked for strict signing.
    monkeypatch.setenv(MODE_ENV, "strict")
    with pytest.raises(ValueError, match=f"{KEY_ENV}=.*no such file.*{MODE_ENV}=strict"):
        save_with_provenance(image, tmp_path / "strict.png", RECORD)


def test_settings_errors_name_the_variable(tmp_path):
    with pytest.raises(ValueError, match="FLUX2_C2PA must be one of on, off, strict, got 'sometimes'"):
        SigningSettings.from_env({MODE_ENV: "sometimes"})
    with pytest.raises(ValueError, match="FLUX2_C2PA_ALG must be one of es256, .*got 'rs256'"):
        SigningSettings.from_env({"FLUX2_C2PA_ALG": "rs256"})
    (tmp_path / "chain.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=f"{CERT_ENV}=.*chain.pem: not a PEM certificate"):
        check_signing({CERT_ENV: str(tmp_path / "chain.pem"), KEY_ENV: str(tmp_path / "chain.pem")})


def test_off_writes_no_manifest_and_a_missing_library_loses_no_image(image, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(MODE_ENV, "off")
    assert read_credentials(save_with_provenance(image, tmp_path / "off.png", RECORD)) is None
    monkeypatch.setenv(MODE_ENV, "on")
    monkeypatch.setitem(sys.modules, "c2pa", None)  # as if c2pa-python were not installed
    path = save_with_provenance(image, tmp_path / "nolib.jpg", RECORD)
    assert read_provenance(path)["seed"] == 42
    assert "without Content Credentials: the c2pa-python package is not installed" in caplog.text
    monkeypatch.delitem(sys.modules, "c2pa")
    assert read_credentials(path) is None


def other_tools_photo(tmp_path) -> str:
    """A JPEG signed by another application, with c2pa-python's Builder directly (not our writer)."""
    cert, key = certificate_chain(tmp_path, "OtherCam Inc", ec.generate_private_key(ec.SECP384R1()))
    manifest = {
        "claim_generator_info": [{"name": "OtherCam", "version": "2.0"}],
        "title": "photo.jpg",
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": CAPTURE,
                 "softwareAgent": {"name": "OtherCam", "version": "2.0"}}]}},
            {"label": "com.example.exposure", "data": {"iso": 100, "shutter": "1/250"}},
        ],
    }  # fmt: skip
    source, signed = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (48, 32), "teal").save(source, format="JPEG")
    info = c2pa.C2paSignerInfo("es384", cert.read_bytes(), key.read_bytes(), None)
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/jpeg", io.BytesIO(source.getvalue()), signed)
    (tmp_path / "photo.jpg").write_bytes(signed.getvalue())
    return "photo.jpg"


def test_info_shows_ours_and_other_tools_manifests(image, tmp_path, cli_env):
    save_with_provenance(image, tmp_path / "ours.png", RECORD)
    Image.new("RGB", (32, 32)).save(tmp_path / "plain.png")
    photo = other_tools_photo(tmp_path)
    env = {**cli_env, "FLUX2_CONFIG_DIR": os.environ["FLUX2_CONFIG_DIR"]}
    result = flux2("info", "ours.png", photo, "plain.png", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    ours, rest = result.stdout.split("\nphoto.jpg: ")
    theirs, plain = rest.split("\nplain.png: ")
    assert "C2PA manifest     signed, untrusted (local self-signed flux2 certificate)" in ours
    assert "action          c2pa.created (trainedAlgorithmicMedia, by flux2 " in ours
    assert "    model           flux.2-klein-4b" in ours and "(inputTo, sha256 " + "ab" * 32 in ours
    assert "C2PA manifest     signed, untrusted (certificate not on a trust list)" in theirs
    assert "signer          OtherCam Inc Signer, issued by OtherCam Inc (Es384)" in theirs
    assert "action          c2pa.created (digitalCapture, by OtherCam 2.0)" in theirs
    assert "generator       OtherCam 2.0" in theirs and "model" not in theirs
    assert "C2PA manifest     none" in plain
    as_json = flux2("info", photo, "--json", cwd=tmp_path, env=env)
    found = json.loads(as_json.stdout)["content_credentials"]
    assert found["state"] == "untrusted" and "com.example.exposure" in found["assertions"]
