import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Counted model sizes (dpotox.plan.resources.size_cache) go to a folder of this run, not ~/.cache;
# the workflow runs the tests start inherit it.
os.environ["DPOTOX_CACHE"] = tempfile.mkdtemp(prefix="dpotox-cache-")

from tiny_models import FAMILIES, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)
