"""Mamba training speed: Seshu's chunked selective scan and the switch that puts it into transformers' Mamba."""

from seshu.models.mamba.fast_path import scan_path, use_fast_scan

__all__ = ["scan_path", "use_fast_scan"]
