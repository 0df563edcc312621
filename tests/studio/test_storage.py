"""The media folder: client paths confined to it, uploads verified, outputs published once."""

import os
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from flux2.studio import storage
from flux2.studio.storage import MediaStore

LIMIT = 64 * 1024


@pytest.fixture
def media(tmp_path) -> MediaStore:
    return MediaStore(tmp_path / "data", max_upload_bytes=LIMIT)


def image_bytes(format: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=format)
    return buffer.getvalue()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_resolve_accepts_urls_relative_and_absolute_paths_inside(media):
    target = media.generated_dir("p1") / "job_1.jpg"
    assert media.resolve("/projects/p1/generated/job_1.jpg") == target
    assert media.resolve("projects/p1/generated/job_1.jpg") == target
    assert media.resolve(str(target)) == target
    assert media.resolve("/uploads/a%20b.png") == media.root / "uploads" / "a b.png"  # a web URL is decoded once
    assert media.resolve("/projects/p1/./generated/job_1.jpg") == target


@pytest.mark.parametrize(
    "client_path",
    [
        "../etc/passwd",
        "/etc/passwd",
        "/projects/../../x",
        "projects/../../x",
        "/projects/p1/../../../etc/passwd",
        "/projects/%2e%2e/%2e%2e/etc/passwd",  # decoded: '..'
        "/uploads/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "%2e%2e/etc/passwd",  # a relative path is not decoded: not under projects/ or uploads/
        "file:///etc/passwd",
        "http://example.com/cat.png",
        "//example.com/cat.png",
        "C:/Windows/win.ini",
        "projects/p1/a\x00.png",
        "/projects/p1/a%00.png",
        "/projects/p1/a.png?download=1",
        "studio.db",  # inside the data folder, but not media
        "tmp/job_1/out.jpg",
        "/",
        "projects/../studio.db",
    ],
)
def test_resolve_refuses_paths_that_leave_the_media(media, client_path):
    with pytest.raises(ValueError, match="inside the data folder") as error:
        media.resolve(client_path, field="image_path")
    assert "image_path" in str(error.value) and repr(client_path) in str(error.value)


def test_resolve_refuses_absolute_paths_elsewhere_and_empty_ones(media, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="outside the data folder"):
        media.resolve(str(tmp_path / "secret.png"))
    with pytest.raises(ValueError, match="non-empty"):
        media.resolve("")


def test_resolve_refuses_symlinks_out(media, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    project = media.project_dir("p1")
    project.mkdir(parents=True)
    (project / "escape").symlink_to(outside, target_is_directory=True)
    (project / "secret.png").symlink_to(outside / "secret.png")
    (project / "tmp_link").symlink_to(media.root / "studio.db")  # inside the folder, outside the media
    for client_path in ("/projects/p1/escape/secret.png", "/projects/p1/secret.png", "projects/p1/tmp_link"):
        with pytest.raises(ValueError, match="symbolic link|inside the data folder"):
            media.resolve(client_path)
    (project / "generated").mkdir()
    (project / "generated" / "a.jpg").write_bytes(b"x")
    (project / "alias.jpg").symlink_to(project / "generated" / "a.jpg")  # a link that stays inside is fine
    assert media.resolve("/projects/p1/alias.jpg") == project / "generated" / "a.jpg"


def test_legacy_generated_urls_find_a_job_output_in_any_project(media):
    output = media.generated_dir("p2") / "job_ab12.jpg"
    thumb = media.thumbnails_dir("p2") / "job_ab12.jpg"
    for file in (output, thumb):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"x")
    assert media.resolve("/generated/job_ab12.jpg") == output
    assert media.resolve("/generated/job_ab12_thumb.jpg") == thumb
    assert media.find_generated("job_ab12_thumb.jpg") == thumb
    for name in ("job_none.jpg", "*.jpg", "../p2/generated/job_ab12.jpg", "job_ab12", ".jpg"):
        assert media.find_generated(name) is None, name
    with pytest.raises(ValueError, match="image_path '/generated/job_none.jpg' names no job output"):
        media.resolve("/generated/job_none.jpg", field="image_path")
    with pytest.raises(ValueError, match="names no job output"):
        media.resolve("/generated/..%2Fp2%2Fgenerated%2Fjob_ab12.jpg")


def test_url_for_round_trips(media):
    path = media.uploads_dir(None) / "a b#1.png"
    url = media.url_for(path)
    assert url == "/uploads/a%20b%231.png"
    assert media.resolve(url) == path
    assert media.url_for("projects/p1/generated/x.jpg") == "/projects/p1/generated/x.jpg"
    assert media.relative_path(media.generated_dir("p1") / "x.jpg") == "projects/p1/generated/x.jpg"
    assert media.relative_path(path) == "uploads/a b#1.png"
    for outside in ("/etc/passwd", media.root / "studio.db", media.tmp_dir / "x", "../x"):
        with pytest.raises(ValueError, match="not a media file"):
            media.url_for(outside)


def test_ids_that_become_file_names_are_checked(media):
    for bad in ("../x", "", "a/b", ".hidden", "x" * 65, "p\x00"):
        with pytest.raises(ValueError, match="project_id"):
            media.project_dir(bad)
        with pytest.raises(ValueError, match="job_id"):
            media.job_workspace(bad)


def test_job_workspace_is_under_tmp(media):
    workspace = media.job_workspace("job_1")
    assert workspace == media.tmp_dir / "job_1" and workspace.is_dir()
    (workspace / "out.jpg").write_bytes(b"x")
    media.clear_workspace("job_1")
    assert not workspace.exists()


def test_publish_moves_into_place_once(media):
    workspace = media.job_workspace("job_1")
    final = media.generated_dir("p1") / "job_1.jpg"
    (workspace / "out.jpg").write_bytes(b"first run")
    assert media.publish(workspace / "out.jpg", final) == final
    assert final.read_bytes() == b"first run" and not (workspace / "out.jpg").exists()
    # The job ran again after a crash: its second output does not replace the first.
    (workspace / "out.jpg").write_bytes(b"second run")
    assert media.publish(workspace / "out.jpg", "projects/p1/generated/job_1.jpg") == final
    assert final.read_bytes() == b"first run" and not (workspace / "out.jpg").exists()
    assert files_under(media.root) == [final]


def test_publish_without_hard_links(media, monkeypatch):
    def no_links(source, target):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    workspace = media.job_workspace("job_1")
    final = media.thumbnails_dir("p1") / "job_1.jpg"
    for content in (b"first", b"second"):
        (workspace / "t.jpg").write_bytes(content)
        assert media.publish(workspace / "t.jpg", final) == final
    assert final.read_bytes() == b"first" and files_under(media.root) == [final]


def test_publish_stays_inside_the_data_folder(media, tmp_path):
    (tmp_path / "elsewhere.jpg").write_bytes(b"x")
    (media.job_workspace("job_1") / "out.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="tmp_file"):
        media.publish(tmp_path / "elsewhere.jpg", media.generated_dir("p1") / "x.jpg")
    with pytest.raises(ValueError, match="final_path"):
        media.publish(media.tmp_dir / "job_1" / "out.jpg", tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="final_path"):
        media.publish(media.tmp_dir / "job_1" / "out.jpg", "../x.jpg")


def test_save_upload_stores_a_verified_image_under_a_generated_name(media):
    path = media.save_upload(image_bytes("PNG"), "../../../etc/cron.d/My Cat!.png", "p1", "reference")
    assert path.parent == media.uploads_dir("p1")
    assert path.name.startswith("reference_") and path.name.endswith("_My-Cat.png")
    with Image.open(path) as image:
        assert image.size == (32, 24)
    assert media.resolve(media.url_for(path)) == path

    jpeg = media.save_upload(image_bytes("JPEG"), "hero.png", "p1", "element")  # the bytes decide the suffix
    assert jpeg.parent == media.elements_dir("p1") and jpeg.suffix == ".jpg"
    loose = media.save_upload(image_bytes("WEBP"), "x", None, "general")
    assert loose.parent == media.uploads_dir(None) and loose.suffix == ".webp"
    assert not list(media.tmp_dir.iterdir())  # nothing left in progress


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "not an image"),
        (image_bytes("PNG", (64, 64))[:-40], "damaged"),  # truncated
        (image_bytes("TIFF"), "accepted formats"),
        (b"\x00" * (LIMIT + 1), "upload limit"),
    ],
)
def test_save_upload_rejects_what_is_not_an_acceptable_image(media, data, message):
    with pytest.raises(ValueError, match=message):
        media.save_upload(data, "cat.png", "p1", "general")
    assert files_under(media.root) == []


def test_save_upload_limits(media, monkeypatch):
    monkeypatch.setattr(storage, "MAX_UPLOAD_PIXELS", 100)
    with pytest.raises(ValueError, match="32x24 px"):
        media.save_upload(image_bytes(), "big.png", None, "general")
    with pytest.raises(ValueError, match="upload type"):
        media.save_upload(image_bytes(), "a.png", None, "script")
    with pytest.raises(ValueError, match="project_id"):
        media.save_upload(image_bytes(), "a.png", "../p1", "general")
    with pytest.raises(ValueError, match="max_upload_bytes"):
        MediaStore(media.root, max_upload_bytes=0)
    assert files_under(media.root) == []


def test_delete_and_remove_project(media):
    path = media.save_upload(image_bytes(), "a.png", "p1", "general")
    assert media.delete(media.url_for(path)) and not path.exists()
    assert media.delete(media.url_for(path)) is False
    with pytest.raises(ValueError, match="inside the data folder"):
        media.delete("../outside.png")
    media.save_upload(image_bytes(), "a.png", "p1", "general")
    media.remove_project("p1")
    assert not media.project_dir("p1").exists()
