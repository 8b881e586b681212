"""Mixtures of experts from dense models: `seshu moe build` (`build`, with its YAML in `config` and the router's
starting rows in `router`) and `seshu moe train-router` (`train`).

Submodules import torch and transformers, so they are imported where they are used, not here: `seshu --help`
stays fast.
"""
