"""The interactive session: the reference's settings, parsing, commands and messages, driven through stdin and
through a pseudo-terminal (model menu, line editing, Ctrl-C cancelling a run while the model stays loaded)."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from command import flux2
from forced_answers import forced_logits, with_yes_no_tokens
from PIL import Image
from terminal import Terminal
from tiny_classifier import save_tiny_image_classifier
from tiny_encoders import tiny_mistral3

from flux2.cli.config import DEFAULT_PROMPT, Config, parse_key_values, updated
from flux2.cli.output import Target
from flux2.cli.repl import Session
from flux2.pipeline import Flux2Pipeline
from flux2.provenance import read_provenance
from flux2.registry import FLUX2_MODEL_INFO, model_info
from flux2.safety import ANSWER_NO, ANSWER_YES, IntegrityChecker, NSFWClassifier, SafetyPolicy

KLEIN = model_info("flux.2-klein-4b")
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- parsing and checks


def parsed(line: str) -> tuple[dict, list[str]]:
    said: list[str] = []
    return parse_key_values(line, said.append), said


def test_every_coercion():
    values, said = parsed(
        "seed=42 width=1024 height=NONE num_steps=8 match_image_size= guidance=2.5 upsample_prompt_mode=OpenRouter "
        'openrouter_model="\'acme/model-1\'" prompt="a sign that says x=1" run'
    )
    assert values == {
        "seed": 42, "width": 1024, "height": None, "num_steps": 8, "match_image_size": None, "guidance": 2.5,
        "upsample_prompt_mode": "openrouter", "openrouter_model": "acme/model-1", "prompt": "a sign that says x=1",
        "run": True,  # a bare word: a command
    }  # fmt: skip
    assert said == []


def test_input_images_list_syntax(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(name)
    both = (Path("a.png"), Path("b.png"))
    assert parsed("input_images=a.png,b.png")[0]["input_images"] == both
    assert parsed('input_images="a.png b.png"')[0]["input_images"] == both
    assert parsed('input_images="[a.png, b.png]"')[0]["input_images"] == both
    assert parsed("input_images=[]")[0]["input_images"] == ()
    assert parsed("input_images=")[0]["input_images"] == ()
    values, said = parsed("input_images=a.png,gone.png")
    assert values["input_images"] == (Path("a.png"),)
    assert said == ["File gone.png not found. Skipping for now. Please check your path"]


def test_unknown_keys_are_reported_and_bad_values_name_the_field():
    values, said = parsed("colour=red seed=1")
    assert values == {"seed": 1} and said == ["! unknown key: colour"]
    for line, message in [
        ("seed=abc", "seed must be an integer (or none), got 'abc'"),
        ("guidance=lots", "guidance must be a number, got 'lots'"),
        ("upsample_prompt_mode=loud", "upsample_prompt_mode must be one of none, local, openrouter"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parsed(line)


def test_model_defaults_and_fixed_parameters():
    default = Config().request
    assert default.prompt == DEFAULT_PROMPT and (default.width, default.height) == (1360, 768)
    assert (Config.for_model(KLEIN).request.num_steps, Config.for_model(KLEIN).request.guidance) == (4, 1.0)
    base = model_info("flux.2-klein-base-4b")
    assert (Config.for_model(base).request.num_steps, Config.for_model(base).request.guidance) == (50, 4.0)
    assert updated(Config.for_model(base), {"num_steps": 28, "guidance": 3.5}, base).request.num_steps == 28
    with pytest.raises(ValueError, match="flux.2-klein-4b is a distilled model: num_steps is fixed at 4"):
        updated(Config.for_model(KLEIN), {"num_steps": 28}, KLEIN)
    with pytest.raises(ValueError, match="width must be a positive multiple of 16 px, at most 4096, got 1000"):
        updated(Config.for_model(base), {"width": 1000}, base)
    with pytest.raises(ValueError, match="does not use a negative prompt"):
        updated(Config.for_model(KLEIN), {"negative_prompt": "blurry"}, KLEIN)


def test_reference_flags_of_scripts_cli():
    spec = importlib.util.spec_from_file_location("reference_cli", ROOT / "scripts" / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.repl_arguments(
        ["--model_name=tiny", "--single_eval=True", "--prompt", "a fox", "--cpu_offloading", "--debug_mode=False",
         "--width=512", "--input_images", "a.png,b.png"]
    )  # fmt: skip
    assert args == ["repl", "--model", "tiny", "--single-eval", "--prompt", "a fox", "--cpu-offload",
                    "width=512", "input_images=a.png,b.png"]  # fmt: skip


# ----------------------------------------------------------------------------- a session through stdin


def test_a_session_through_stdin(tmp_path, cli_env):
    (tmp_path / "broken.png").write_text("not an image")
    lines = [
        "width=64 height=64 seed=3",
        "a red fox in the snow",  # no `=`: the new prompt, not a run
        "num_steps=2 colour=red",
        "seed=5 dance",
        "width=100",
        "?",
        "",  # an empty line runs
        "input_images=broken.png",
        "",  # fails: reported, and the session goes on
        "input_images=[] height=32",
        "run",
        "show",
        "reset",
        "quit",
    ]
    result = flux2("repl", "--model", "tiny", cwd=tmp_path, env=cli_env, stdin="\n".join(lines) + "\n")
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, err
    assert "  width                 64\n  height                64\n  seed                  3\n" in out
    assert "  prompt                a red fox in the snow" in out
    assert "! unknown key: colour" in out and "! Unknown command: dance" in out
    message = "width must be a positive multiple of 16 px, at most 4096, got 100 (nearest allowed: 96 or 112)"
    assert f"ERROR: {message}\nThe settings are unchanged." in err
    assert "Commands: run, show, reset" in out  # `?` is help
    assert "Saved output/flux2-5.png (seed 5)" in out
    assert "ERROR: ValueError: reference image 0 (broken.png) is not a readable image" in err
    assert "The model is still loaded. Please fix the error and try again." in err
    assert "Saved output/flux2-5-1.png (seed 5)" in out  # never overwrites
    assert out.rstrip().endswith("bye!")
    before_quit = out[: out.rindex("> bye!")]
    shown = before_quit[before_quit.rindex("> ") :]  # what `reset` printed: the model's defaults again
    assert "num_steps             4" in shown and "width                 1360" in shown
    record = read_provenance(tmp_path / "output" / "flux2-5.png")
    assert (record["prompt"], record["seed"], record["num_steps"]) == ("a red fox in the snow", 5, 2)
    assert Image.open(tmp_path / "output" / "flux2-5-1.png").size == (64, 32)


def test_the_session_survives_bad_lines_and_ends_at_end_of_input(tmp_path, cli_env):
    lines = ["input_images=" + "x" * 300, "h", "reset seed=5", "show"]  # no quit: the input just ends
    result = flux2("repl", "--model", "tiny", cwd=tmp_path, env=cli_env, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "not found. Skipping for now." in result.stdout and "Commands: run, show" in result.stdout
    shown = result.stdout[result.stdout.rindex("> show") :] if "> show" in result.stdout else result.stdout
    assert "seed                  5" in shown  # reset first, then the seed, in the order typed
    assert result.stdout.rstrip().endswith("bye!") and "Traceback" not in result.stderr


def test_distilled_model_keeps_its_steps_and_guidance(tmp_path, cli_env, klein_weights):
    studio, _ = klein_weights
    args = ["repl", "--model", "flux.2-klein-4b", "--weights-dir", str(studio)]
    result = flux2(*args, cwd=tmp_path, env=cli_env, stdin="num_steps=8\nguidance=3.5\nshow\nquit\n")
    assert result.returncode == 0, result.stderr
    assert "ERROR: flux.2-klein-4b is a distilled model: num_steps is fixed at 4 (got 8)" in result.stderr
    assert "guidance is fixed at 1.0 (got 3.5)" in result.stderr
    assert "num_steps             4\n  guidance              1.0" in result.stdout
    startup = flux2(*args, "num_steps=8", cwd=tmp_path, env=cli_env, stdin="")
    assert startup.returncode == 1 and "num_steps is fixed at 4" in startup.stderr
    assert "Traceback" not in startup.stderr


def test_single_eval_through_the_reference_entry_point(tmp_path, cli_env):
    script = str(ROOT / "scripts" / "cli.py")
    args = [script, "--model_name=tiny", "--single_eval=True", "--prompt=a fox", "--width=64", "--height", "64",
            "--seed=9"]  # fmt: skip
    result = subprocess_run(args, tmp_path, cli_env)
    assert result.returncode == 0, result.stderr
    assert "Saved output/flux2-9.png (seed 9)" in result.stdout
    assert read_provenance(tmp_path / "output" / "flux2-9.png")["prompt"] == "a fox"


def subprocess_run(args, cwd, env):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


# ----------------------------------------------------------------------------- at a terminal


@pytest.fixture
def terminal(tmp_path, cli_env):
    sessions = []

    def start(*args: str) -> Terminal:
        sessions.append(Terminal(["-m", "flux2", *args], env={**cli_env, "TERM": "dumb"}, cwd=tmp_path))
        return sessions[-1]

    yield start
    for session in sessions:
        session.close()


def test_at_a_terminal_menu_then_ctrl_c_cancels_the_run_only(terminal, tmp_path):
    term = terminal()  # no subcommand at a terminal: the REPL
    term.expect("Select a model [default: flux.2-klein-4b]: ")
    term.send("99")
    term.expect("! unknown model '99'")
    term.send(str(list(FLUX2_MODEL_INFO).index("tiny") + 1))
    term.expect("> ")
    term.send("width=1024 height=1024 seed=1 num_steps=200")  # long enough to interrupt
    term.expect("> ")
    term.send("")
    term.expect("denoising")
    term.interrupt()
    term.expect("cancelling after the current step")
    term.expect("Cancelled; the model is still loaded.")
    term.expect("> ")
    term.send("width=64 height=64 num_steps=2")
    term.expect("> ")
    term.send("")
    term.expect("Saved output/flux2-1.png (seed 1)")
    term.send("quit")
    term.expect("bye!")
    assert term.wait() == 0
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["flux2-1.png"]  # nothing from the cancel
    assert (tmp_path / ".flux2_history").is_file()  # readline history, kept in $HOME


def test_end_of_input_at_the_menu_says_bye(terminal):
    term = terminal("repl")
    term.expect("Select a model")
    term.send("\x04")  # Ctrl-D
    term.expect("bye!")
    assert term.wait() == 0


# ----------------------------------------------------------------------------- moderation


@pytest.fixture(scope="module")
def moderated(tmp_path_factory):
    """A tiny pipeline whose safety policy flags every image (threshold 0) and asks a tiny chat model about
    prompts; the chat model's answer is set by each test."""
    folder = save_tiny_image_classifier(tmp_path_factory.mktemp("nsfw"), {0: "normal", 1: "nsfw"})
    model, tokenizer = with_yes_no_tokens(*tiny_mistral3(seed=0))
    checker = IntegrityChecker(model, tokenizer)
    policy = SafetyPolicy("full", classifier=NSFWClassifier(folder, threshold=0.0), integrity=checker)
    pipe = Flux2Pipeline("tiny", device="cpu", safety=policy)
    yes, no = tokenizer.convert_tokens_to_ids([ANSWER_YES, ANSWER_NO])
    return pipe, model, yes, no


def session(pipe, tmp_path) -> Session:
    args = argparse.Namespace(verbose=False, upsample_model=None, upsample_url=None)
    return Session(pipe, Config.for_model(pipe.info), Target(tmp_path, None, ".png"), args)


def test_new_prompts_and_input_images_are_moderated(moderated, tmp_path, capsys):
    pipe, model, yes, no = moderated
    repl = session(pipe, tmp_path)
    with forced_logits(model, {yes: 50.0}), torch.inference_mode():
        repl.handle("a famous person")
    flagged = "Your prompt has been flagged for potential copyright or public personas concerns."
    assert flagged in capsys.readouterr().out
    assert repl.config.request.prompt == DEFAULT_PROMPT
    with forced_logits(model, {no: 50.0}), torch.inference_mode():
        repl.handle("a red fox")
    assert repl.config.request.prompt == "a red fox"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    repl.handle(f"input_images={tmp_path / 'in.png'}")
    assert f"The image {tmp_path / 'in.png'} has been flagged as unsuitable" in capsys.readouterr().out
    assert repl.config.request.reference_images == ()
    (tmp_path / "broken.png").write_text("not an image")
    assert repl.handle_safely(f"input_images={tmp_path / 'broken.png'}") is None  # screened, fails, session goes on
    assert "The model is still loaded" in capsys.readouterr().err


def test_upsampling_mode_set_in_the_session(tmp_path, cli_env):
    from chat_api import Reply, completion, running_chat_server

    with running_chat_server() as chat:
        chat.replies = [Reply(body=completion("a red fox in fresh snow, low sun"))]
        env = {**cli_env, "OPENROUTER_API_KEY": "test-key"}
        lines = "width=64 height=64 seed=2\nupsample_prompt_mode=OpenRouter openrouter_model=acme/m\na fox\n\nquit\n"
        result = flux2("repl", "--model", "tiny", "--upsample-url", chat.base_url, cwd=tmp_path, env=env, stdin=lines)
        assert chat.received[0].body["model"] == "acme/m"
    assert result.returncode == 0, result.stderr
    assert "Upsampled prompt: a red fox in fresh snow, low sun" in result.stdout
    record = read_provenance(tmp_path / "output" / "flux2-2.png")
    assert (record["prompt"], record["upsampled_prompt"]) == ("a fox", "a red fox in fresh snow, low sun")


def test_a_list_setting_takes_comma_separated_values():
    assert parsed("seed_list=1,2,3")[0]["seed_list"] == (1, 2, 3)
    assert parsed("seed_list=[]")[0]["seed_list"] == ()
    with pytest.raises(ValueError, match="seed_list must be an integer"):
        parsed("seed_list=1,x")
