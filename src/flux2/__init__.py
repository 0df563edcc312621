"""FLUX.2 image generation and editing."""

__version__ = "0.1.0"
