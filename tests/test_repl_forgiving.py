"""The interactive session forgives: the menu says which models are here, a model without weights sends the user
back to the menu rather than out of the session, and a mistyped input_images path keeps the earlier references."""

import argparse
from pathlib import Path

from command import flux2
from PIL import Image

from flux2.cli import main
from flux2.cli.config import Config
from flux2.cli.output import Target
from flux2.cli.repl import Session
from flux2.pipeline import Flux2Pipeline
from flux2.registry import FLUX2_MODEL_INFO


def fake_klein_folder(folder: Path) -> Path:
    """A weights folder whose flux.2-klein-4b parts are all there (as names: the menu never reads them)."""
    for name in ("flux-2-klein-4b.safetensors", "ae.safetensors", "text_encoder/config.json", "tokenizer/t.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def menu_line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if f". {name} " in line)


def test_the_menu_marks_models_here_and_a_missing_one_goes_back_to_the_menu(tmp_path, cli_env):
    env = {**cli_env, "FLUX2_WEIGHTS_DIR": str(fake_klein_folder(tmp_path / "weights"))}
    number = {name: str(i) for i, name in enumerate(FLUX2_MODEL_INFO, 1)}
    answers = [number["flux.2-dev"], number["tiny"], "quit"]  # dev has no weights here: the menu comes back
    result = flux2("repl", cwd=tmp_path, env=env, stdin="\n".join(answers) + "\n")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "  here " in menu_line(out, "flux.2-klein-4b")
    assert "3/4 here" in menu_line(out, "flux.2-dev")  # the folder's autoencoder and text encoder serve it too
    assert "built in" in menu_line(out, "tiny")
    assert "! missing weights for flux.2-dev" in out and "FLUX2_MODEL_PATH" in out and "FLUX2_WEIGHTS_DIR" in out
    assert out.count("Select a model") == 2 and out.rstrip().endswith("bye!")
    assert "Traceback" not in result.stderr


def test_a_model_named_on_the_command_line_still_fails_as_before(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("FLUX2_WEIGHTS_DIR", "FLUX2_MODEL_PATH", "AE_MODEL_PATH", "MISTRAL_SMALL_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert main(["repl", "--model", "flux.2-dev"]) == 1  # a script sees the error and the exit status
    assert "missing weights for flux.2-dev" in capsys.readouterr().err


def test_a_mistyped_input_images_path_keeps_the_earlier_references(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(name)
    pipe = Flux2Pipeline("tiny", device="cpu")
    args = argparse.Namespace(verbose=False, upsample_model=None, upsample_url=None)
    repl = Session(pipe, Config.for_model(pipe.info), Target(tmp_path, None, ".png"), args)
    repl.handle("input_images=a.png")
    assert repl.config.request.reference_images == (Path("a.png"),)
    capsys.readouterr()
    for typo in ("input_images=gone.png", "input_images=b.png,gone.png seed=3"):
        repl.handle(typo)
        out = capsys.readouterr().out
        assert "File gone.png not found." in out and "! input_images unchanged (still: a.png)" in out
        assert repl.config.request.reference_images == (Path("a.png"),)
    assert repl.config.request.seed == 3  # the rest of the line still applies
    repl.handle("input_images=a.png,b.png")
    assert repl.config.request.reference_images == (Path("a.png"), Path("b.png"))
    repl.handle("input_images=[]")
    assert repl.config.request.reference_images == ()  # clearing on purpose still clears
