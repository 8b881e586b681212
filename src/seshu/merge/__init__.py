"""Merging: folding adapters into their base, and weight-space merges of models or adapters (`seshu merge`).

Submodules import torch and peft, so they are imported where they are used, not here: `seshu --help` stays fast.
"""
