"""Shared test helpers: seeded fresh inputs, one intra-op thread; the tolerance rule lives in
sketchcolor.testing."""
from __future__ import annotations

import os
import signal
import zlib

import pytest
import torch

# Re-exported for the test modules (``from conftest import assert_close_to_reference``): the
# rule is defined once, in the package, so that ``sketchcolor verify`` applies the same one.
from sketchcolor.testing import assert_close_to_reference, low_precision_tolerance  # noqa: F401


def pytest_configure(config):
    """SKETCHCOLOR_GUARD_CPU_MEMORY=1 (or =end): every CPU tensor of the session is allocated in the
    CUDA emulator's device memory (tests/cuda_emulator.py): NaN-filled and ending at an inaccessible
    page, so a kernel that reads or writes past a tensor's storage faults at once instead of
    touching its neighbour. =start: each tensor starts right after an inaccessible page instead,
    so an access before its storage (a row index of -1) faults. Triton's interpreter runs the
    kernels on these tensors' memory; .ci/run sets it for the Triton tests' second run. Slows
    allocation: not for the whole suite."""
    guard = os.environ.get("SKETCHCOLOR_GUARD_CPU_MEMORY")
    if guard is None:
        return
    if guard not in ("1", "end", "start"):
        raise pytest.UsageError(f"SKETCHCOLOR_GUARD_CPU_MEMORY must be 1, end or start, got {guard!r}")
    from cuda_emulator import load_emulator, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise pytest.UsageError(f"SKETCHCOLOR_GUARD_CPU_MEMORY={guard}, but {reason}")
    emulator = load_emulator()
    emulator.set_guarded_edge("start" if guard == "start" else "end")
    emulator.use_device_allocator(True)


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


@pytest.fixture
def ctrl_c_at_step_2(monkeypatch):
    """A Ctrl-C (SIGINT) during the training loop's second step."""
    import sketchcolor.train as train_module

    original, calls = train_module.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(train_module, "train_step", step)
