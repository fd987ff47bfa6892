"""Run the Triton kernels on CPU tensors: the interpreter must be on before `oreal_kernels` is imported.

`triton.jit` decides at decoration time whether a kernel is compiled or interpreted, so the
variable is set here, when pytest loads this folder, before any test module imports the kernels.
The AOT test compiles for GPUs that are not present in a subprocess that unsets it again.
"""

import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"

_runtime = sys.modules.get("oreal_kernels._runtime")
if _runtime is not None and not _runtime.INTERPRET:
    raise pytest.UsageError(
        "oreal_kernels was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
        "run these tests on their own (python -m pytest tests/kernels) or set TRITON_INTERPRET=1 yourself")
