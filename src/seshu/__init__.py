"""Seshu: build small language models by the public, for the public."""

# The one place the version lives: pyproject.toml reads it from here (see RELEASE_PROCESS.md).
__version__ = "0.1.0"
