"""The `flux2` command: the reference's interactive REPL plus one-shot subcommands.

main.py parses and dispatches; each subcommand lives in its own module (repl, generate, models, info), and
options.py holds the options they share.
"""

from flux2.cli.main import main

__all__ = ["main"]
