"""Seshu: build small language models by the public, for the public."""

__version__ = "0.1.0"
