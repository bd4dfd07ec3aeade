"""CuTe DSL kernels of moba_cute.

Kept light on purpose: importing this package imports nothing heavy (no cutlass, no torch);
the kernel modules are imported on first use (see :mod:`moba_cute.kernels.route_launch`).
"""

__all__ = ["common", "centroids", "topk_routing", "key_major_index", "route_launch"]
