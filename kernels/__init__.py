"""Triton kernels of cgidm, one file per op: ``pgd_update`` (the fused L2 PGD update),
``draw_noise`` (the counter-based draws of ``cgidm.rng``) and ``linf_update`` (the L-inf
step of ``cgidm protect``).

This folder is the top-level ``kernels/`` of the repository; setup.py maps it onto the
``cgidm.kernels`` package (``package_dir={"cgidm.kernels": "kernels"}``), so it is imported
as ``cgidm.kernels.<op>``. The kernels are registered as torch ops by
``cgidm.ops.triton_ops()``.
"""
