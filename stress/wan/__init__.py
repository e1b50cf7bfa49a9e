"""Emulated internet paths between peers in network namespaces (see paths.py, docs/wan.md)."""

from .paths import PathSpec, WanPaths, WanUnavailable, available, build, plan_paths

__all__ = ["PathSpec", "WanPaths", "WanUnavailable", "available", "build", "plan_paths"]
