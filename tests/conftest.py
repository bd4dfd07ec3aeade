import os
import tempfile

import pytest
import torch

# The DSL writes kept PTX/cubin files into its dump directory (the working directory by
# default); send them to a scratch folder so tests leave the checkout clean. Each pytest-xdist
# worker gets its own, so that two workers compiling the same kernel never share a file.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker or "CUTE_DSL_DUMP_DIR" not in os.environ:
    os.environ["CUTE_DSL_DUMP_DIR"] = tempfile.mkdtemp(prefix=f"moba-cute-dump-{_worker or 'main'}-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
