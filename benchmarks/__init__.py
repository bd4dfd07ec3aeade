"""moba_cute benchmark suite (SPEC section 4): ``python -m benchmarks.run --suite ...``.

Modules: ``configs`` (suites), ``flops`` (attended pairs, FLOPs), ``timing`` (CUDA-event
timer), ``results`` (record schema, JSON, table), ``baselines`` (FA2, FA4), ``flex_moba``
(FlexAttention with a MoBA mask), ``moba`` (moba_cute paths), ``plot`` (PNG), ``run`` (CLI),
``host`` (the host-overhead suite, ``--suite host``).
Everything but the measurement itself imports and runs without CUDA. See docs/benchmarks.md.
"""
