"""Test-session settings: one CPU thread per process.

On a busy 2-core machine, multithreaded torch and BLAS kernels fight each other: measured here, the
same files ran 3-5x faster with one thread. The variables must be set before numpy loads its BLAS.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """accelerate keeps process-wide state (mixed precision among it); every test starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
