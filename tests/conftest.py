"""Shared test helpers: seeded fresh inputs, one intra-op thread; the tolerance rule lives in
sketchcolor.testing."""
from __future__ import annotations

import zlib

import pytest
import torch

# Re-exported for the test modules (``from conftest import assert_close_to_reference``): the
# rule is defined once, in the package, so that ``sketchcolor verify`` applies the same one.
from sketchcolor.testing import assert_close_to_reference, low_precision_tolerance  # noqa: F401


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible seed per test: fresh inputs, never shared zeros.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a whole test module; a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    # Tiny models and small tensors gain nothing from intra-op threads, and on a shared 2-core
    # machine spinning threads slow everything down. Module scope: the module's own module-scoped
    # fixtures (e.g. runs that later tests compare with bitwise) then see the same thread count,
    # hence the same reduction order, as its tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
