"""Triton kernels of the PGD update, installed as ``cgidm.kernels``."""
