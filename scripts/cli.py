"""The reference's entry point, kept for people following its instructions:

    PYTHONPATH=src python scripts/cli.py --model_name=flux.2-klein-4b --single_eval=True --prompt="a fox"

The reference's flags (`--model_name`, `--single_eval`, `--prompt`, `--debug_mode`, `--cpu_offloading`, and
`--<config field>=<value>`, in either `--flag=value` or `--flag value` form) become a `flux2 repl` command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs with or without PYTHONPATH=src

from flux2.cli import main  # noqa: E402

SWITCHES = {"single_eval": "--single-eval", "debug_mode": "--debug-mode", "cpu_offloading": "--cpu-offload"}
VALUED = {"model_name": "--model", "prompt": "--prompt"}
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def repl_arguments(argv: list[str]) -> list[str]:
    """`flux2 repl` arguments for the reference's flags; a bare switch means True, as with python-fire."""
    if {"-h", "--help"} & set(argv):
        return ["repl", "--help"]
    options, settings = [], []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise SystemExit(f"error: unexpected argument {token!r}; flags look like --name=value")
        name, has_value, value = token[2:].replace("-", "_").partition("=")
        if not has_value and tokens and not tokens[0].startswith("--"):
            if name not in SWITCHES or tokens[0].lower() in TRUE | FALSE:  # `--flag value` form
                value, has_value = tokens.pop(0), True
        if name in SWITCHES:
            if not has_value or value.lower() in TRUE:
                options.append(SWITCHES[name])
            elif value.lower() not in FALSE:
                raise SystemExit(f"error: --{name} takes True or False, got {value!r}")
        elif name in VALUED:
            options += [VALUED[name], value]
        else:
            settings.append(f"{name}={value}")
    return ["repl", *options, *settings]


if __name__ == "__main__":
    sys.exit(main(repl_arguments(sys.argv[1:])))
