"""Test-session settings: one CPU thread per process.

On a busy 2-core machine, multithreaded torch and BLAS kernels fight each other: measured here, the
same files ran 3-5x faster with one thread. The variables must be set before numpy loads its BLAS.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)
