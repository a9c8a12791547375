"""Datasets and their loaders (installed as stmd_fast.data)."""
