import os
import tempfile

import pytest
import torch

# The DSL writes kept PTX/cubin files into its dump directory (the working directory by
# default); send them to a scratch folder so tests leave the checkout clean.
os.environ.setdefault("CUTE_DSL_DUMP_DIR", tempfile.mkdtemp(prefix="moba-cute-dump-"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
