"""Triton kernels, each beside its pure-PyTorch reference; dispatch.py picks which runs."""
