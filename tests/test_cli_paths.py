"""Paths a user gives: checked before anything loads, an image never lost to a failed save, loading errors that
name the file and what pointed at it, `./dev` run from the caller's folder, and `GeneratedImage.save`."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux2.checkpoints import CheckpointError, read_safetensors
from flux2.cli import main
from flux2.pipeline import Flux2Pipeline
from flux2.provenance import read_provenance, sidecar_path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--width", "32", "--height", "32"]
OUR_VARIABLES = ("FLUX2_MODEL", "FLUX2_WEIGHTS_DIR", "KLEIN_4B_MODEL_PATH", "AE_MODEL_PATH", "QWEN3_4B_PATH")


@pytest.fixture
def in_folder(tmp_path, monkeypatch):
    """`main()` in this process, run from tmp_path with none of our variables set."""
    monkeypatch.chdir(tmp_path)
    for var in OUR_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def no_loading(*args, **kwargs):
    raise AssertionError("a bad path must fail before any model loads")


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize(
    "command,output,message",
    [
        ("generate", "/proc/out.png", "-o /proc/out.png: cannot create files in /proc"),
        ("generate", "file.png/out.png", "-o file.png/out.png: file.png is a file, not a folder"),
        ("generate", "file.png/deeper/", "-o file.png/deeper: file.png is a file, not a folder"),
        ("repl", "file.png/shots", "-o file.png/shots: file.png is a file, not a folder"),
    ],
)
def test_a_bad_output_path_fails_before_loading(in_folder, tmp_path, capsys, command, output, message):
    in_folder.setattr("flux2.pipeline.Flux2Pipeline.__init__", no_loading)
    (tmp_path / "file.png").write_text("")
    args = ["generate", "x", *SMALL] if command == "generate" else ["repl", "--model", "tiny"]
    assert main([*args, "-o", output]) == 1
    assert message in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]  # nothing made, no probe left


def test_a_missing_input_names_the_flag_and_the_folder(in_folder, tmp_path, capsys):
    in_folder.setattr("flux2.pipeline.Flux2Pipeline.__init__", no_loading)
    assert main(["generate", "x", *SMALL, "-i", "missing.png"]) == 1
    line = error_line(capsys)
    assert "-i missing.png: input image 0 not found" in line and str(tmp_path) in line


def test_a_failed_save_keeps_the_image_and_says_where(in_folder, tmp_path, capsys):
    run = Flux2Pipeline.run

    def folder_taken_meanwhile(self, *args, **kwargs):
        outputs = run(self, *args, **kwargs)
        (tmp_path / "shots").write_text("")  # the folder -o names is now a file: saving there fails
        return outputs

    in_folder.setattr(Flux2Pipeline, "run", folder_taken_meanwhile)
    assert main(["generate", "a fox", *SMALL, "--seed", "5", "-o", "shots/fox.jpg"]) == 4
    captured = capsys.readouterr()
    assert f"saved {tmp_path / 'flux2-5.png'} (seed 5)" in captured.out  # the path it really has
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "could not save in shots" in line and "saved seed 5 to" in line and "flux2-5.png instead" in line
    assert read_provenance(tmp_path / "flux2-5.png")["prompt"] == "a fox"


def test_when_the_current_folder_fails_too_the_image_goes_to_the_temporary_folder(tmp_path, monkeypatch):
    from flux2.cli import output

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(output.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    save = output.save_with_provenance

    def disk_full_here(image, path, record, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(28, "No space left on device", str(path))
        return save(image, path, record, **kwargs)

    monkeypatch.setattr(output, "save_with_provenance", disk_full_here)
    saved = output.save_or_rescue(Image.new("RGB", (8, 8)), {"seed": 9}, output.Target(tmp_path, "a", ".jpg"))
    assert saved.path == tmp_path / "tmp" / "flux2-9.png" and read_provenance(saved.path)["seed"] == 9
    assert saved.problem == f"could not save in {tmp_path} (No space left on device: {tmp_path / 'a.jpg'})"
    assert not (tmp_path / "a.jpg").exists()  # no empty file left under the name it claimed


def write_truncated_checkpoint(path: Path) -> Path:
    save_file({"w": torch.zeros(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    return path


def test_a_truncated_checkpoint_names_the_file_and_the_variable(tmp_path, monkeypatch):
    path = write_truncated_checkpoint(tmp_path / "klein.safetensors")
    monkeypatch.setenv("KLEIN_4B_MODEL_PATH", str(path))
    with pytest.raises(CheckpointError) as err:
        read_safetensors(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a readable safetensors file (")
    assert "truncated or corrupt download?" in message
    assert "re-download with `flux2 download flux.2-klein-4b` or fix $KLEIN_4B_MODEL_PATH" in message
    assert isinstance(err.value, ValueError)


def test_a_corrupt_file_in_the_hub_cache_says_to_delete_and_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for var in OUR_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    snapshot = tmp_path / "models--black-forest-labs--FLUX.2-klein-4B" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    path = write_truncated_checkpoint(snapshot / "flux-2-klein-4b.safetensors")
    with pytest.raises(CheckpointError, match="delete it from the Hugging Face cache, then run `flux2 download "
                       "flux.2-klein-4b`"):  # fmt: skip
        read_safetensors(path)


def test_a_corrupt_checkpoint_through_the_command(in_folder, tmp_path, capsys, klein_weights):
    studio, _ = klein_weights
    path = write_truncated_checkpoint(tmp_path / "flux-2-klein-4b.safetensors")
    in_folder.setenv("KLEIN_4B_MODEL_PATH", str(path))
    args = ["generate", "x", "--model", "flux.2-klein-4b", "--width", "64", "--height", "64", "--weights-dir"]
    assert main([*args, str(studio)]) == 1
    line = error_line(capsys)
    assert f"{path} is not a readable safetensors file" in line and "fix $KLEIN_4B_MODEL_PATH" in line
    assert "unexpected" not in line
    folder = tmp_path / "weights"
    shutil.copytree(studio, folder)
    write_truncated_checkpoint(folder / "ae.safetensors")
    in_folder.delenv("KLEIN_4B_MODEL_PATH")
    assert main([*args, str(folder)]) == 1
    line = error_line(capsys)
    assert f"{folder / 'ae.safetensors'} is not a readable safetensors file" in line and "--weights-dir" in line


def fake_checkout(tmp_path: Path) -> Path:
    """The `dev` script in a folder of its own, with this checkout's installed .venv (its bin linked) and an
    up-to-date install stamp, so that it runs without reinstalling."""
    repo = tmp_path / "checkout"
    (repo / ".venv").mkdir(parents=True)
    shutil.copy2(ROOT / "dev", repo / "dev")
    shutil.copy2(ROOT / "pyproject.toml", repo / "pyproject.toml")
    os.utime(repo / "pyproject.toml", (0, 0))
    (repo / ".venv" / "bin").symlink_to(ROOT / ".venv" / "bin")
    (repo / ".venv" / ".installed").touch()
    return repo


def test_dev_runs_flux2_in_the_callers_folder(tmp_path, cli_env):
    repo = fake_checkout(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    Image.new("RGB", (64, 64), "red").save(work / "rel.png")
    env = {**cli_env, "FLUX2_MODEL": "tiny"}
    args = [str(repo / "dev"), "flux2", "generate", "x", "--width", "32", "--height", "32", "-i", "rel.png"]
    result = subprocess.run([*args, "-o", "out.png"], cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert (work / "out.png").is_file() and not (repo / "output").exists()


def test_a_generated_image_saves_with_its_record(tmp_path):
    [out] = Flux2Pipeline("tiny", device="cpu").generate("a fox", seed=4, width=32, height=32, num_steps=1)
    assert out.save(tmp_path / "fox.png") == tmp_path / "fox.png"
    assert read_provenance(tmp_path / "fox.png")["seed"] == 4
    out.save(str(tmp_path / "fox.jpg"), sidecar=True)
    assert read_provenance(tmp_path / "fox.jpg")["prompt"] == "a fox" and sidecar_path(tmp_path / "fox.jpg").is_file()
