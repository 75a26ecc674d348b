"""Triton kernels of recsys_ccl, installed as `recsys_ccl.kernels`."""
