"""The generation options of `flux2 generate` / `flux2 edit`, made from GenerationRequest's fields: a new request
field with `cli=True` becomes an option here with its type, choices and help, and nothing else to edit."""

import argparse

from flux2.request import GenerationRequest, LoraChoice, Param, request_params


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_request_options(p: argparse.ArgumentParser) -> None:
    for name, spec in request_params().items():
        if spec.cli:
            names = [flag(name)] + ([spec.flag_alias] if spec.flag_alias else [])
            help = f"{spec.help}. Allowed: {spec.describe()}"
            p.add_argument(*names, dest=name, default=None, help=help, **_argument(spec))


def _argument(spec: Param) -> dict:
    if spec.kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if spec.kind is LoraChoice:  # repeatable: --lora style.safetensors:0.8 --lora detail.safetensors
        return {"type": LoraChoice.parse, "action": "append", "metavar": "PATH[:STRENGTH]"}
    return {"type": spec.kind, "choices": spec.choices or None, "metavar": "|".join(spec.choices) or None}


def request_from_args(args: argparse.Namespace, **more) -> GenerationRequest:
    """The request the options describe (options not given keep the request's defaults)."""
    given = {name: getattr(args, name) for name, spec in request_params().items() if spec.cli}
    return GenerationRequest.from_settings("generate", **{k: v for k, v in given.items() if v is not None}, **more)
