"""moba_cute: Mixture-of-Block-Attention (MoBA) for PyTorch, with CuTe DSL kernels.

Public API (see SPEC section 2 and the README):

* :func:`varlen_attention`: MoBA attention on packed variable-length batches.
* :func:`attention`: the same on padded (B, S, H, D) batches.
* :func:`route`: the routing alone, as a :class:`Routing` (query-major and key-major).
* :func:`attention_with_routing`: attention with a given routing.
* :func:`key_centroids`: the full chunks' centroids, a cache that decode steps read instead of K.
"""

from .interface import (
    UnsupportedError,
    attention,
    attention_with_routing,
    kernel_paths,
    key_centroids,
    route,
    set_decode_path,
    set_strict_checks,
    varlen_attention,
)
from .routing import Routing

__version__ = "0.1.0"

__all__ = [
    "varlen_attention",
    "attention",
    "route",
    "attention_with_routing",
    "key_centroids",
    "Routing",
    "kernel_paths",
    "set_strict_checks",
    "set_decode_path",
    "UnsupportedError",
    "__version__",
]
