"""Merging: folding adapters into their base, and (to come) weight-space merges and MoE assembly.

Submodules import torch and peft, so they are imported where they are used, not here: `seshu --help` stays fast.
"""
