"""Provenance metadata written with every image and read back."""

import numpy as np
import pytest
from PIL import Image

from flux2.provenance import read_exif_tags, read_provenance, save_with_provenance, sidecar_path

RECORD = {
    "model": "flux.2-klein-4b",
    "prompt": "a café sign that says «FLUX.2» 🦊",
    "upsampled_prompt": 'A weathered wooden café sign reading "FLUX.2"',
    "negative_prompt": None,
    "seed": 1234567,
    "num_steps": 4,
    "guidance": 1.0,
    "width": 80,
    "height": 64,
    "references": ["ab" * 32],
}


@pytest.fixture
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp"])
def test_round_trip(image, tmp_path, suffix):
    path = save_with_provenance(image, tmp_path / f"out{suffix}", RECORD)
    stored = read_provenance(path)
    assert {k: stored[k] for k in RECORD} == RECORD
    assert stored["software"] == "flux2" and stored["version"]
    assert read_exif_tags(path) == {"Software": "AI generated;flux2", "Make": "Black Forest Labs"}
    with Image.open(path) as reopened:
        assert reopened.size == image.size


def test_png_pixels_are_untouched(image, tmp_path):
    path = save_with_provenance(image, tmp_path / "out.png", RECORD)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_sidecar_survives_stripped_metadata(image, tmp_path):
    path = save_with_provenance(image, tmp_path / "out.jpg", RECORD, sidecar=True)
    assert sidecar_path(path).name == "out.jpg.json"
    Image.open(path).save(path, quality=90)  # re-saving without exif strips the metadata
    assert read_provenance(path)["seed"] == RECORD["seed"]  # from the sidecar now
    sidecar_path(path).unlink()
    assert read_provenance(path) is None


def test_unknown_format_is_a_clear_error(image, tmp_path):
    with pytest.raises(ValueError, match="must end in one of .png"):
        save_with_provenance(image, tmp_path / "out.tiff", RECORD)


def test_a_record_too_long_for_exif_goes_to_the_sidecar(image, tmp_path):
    long = dict(RECORD, prompt="a very long prompt " * 4000)  # about 150 KB of UTF-16, over the 64 KiB segment
    path = save_with_provenance(image, tmp_path / "long.jpg", long)
    assert sidecar_path(path).is_file()
    assert read_provenance(path)["prompt"] == long["prompt"]
    sidecar_path(path).unlink()
    shortened = read_provenance(path)
    assert shortened["truncated"] and "prompt" not in shortened and shortened["seed"] == RECORD["seed"]


def test_many_references_still_save_as_jpeg(image, tmp_path):
    many = dict(RECORD, references=["cd" * 32] * 1000)  # 64 KB of hashes alone
    path = save_with_provenance(image, tmp_path / "many.jpg", many)
    assert read_provenance(path)["references"] == many["references"]  # whole, from the sidecar
    sidecar_path(path).unlink()
    essentials = read_provenance(path)
    assert essentials["seed"] == RECORD["seed"] and essentials["truncated"] and "references" not in essentials
