"""The portable run (`make test-portable`, tests/run_portable.py) proves something only if its
narrowing took effect: checked here, inside that run, against each library's own report. MKL's
and oneDNN's instruction caps (inside torch) are set too, but neither library offers a query that
torch exposes, so they are not checked."""

import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.numeric,
    pytest.mark.skipif(
        not os.environ.get("TWIN_ML_PORTABLE_RUN"), reason="only in make test-portable"
    ),
]


def test_the_portable_run_uses_the_narrow_kernels():
    import onnx
    import onnxruntime as ort
    import torch
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    from onnx import TensorProto, helper

    from twin_ml._ort import session

    wide = [d for d in __cpu_dispatch__ if d.startswith(("AVX512", "X86_V4"))]
    assert not [d for d in wide if __cpu_features__.get(d)], "numpy still dispatches to AVX-512"
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = session(model.SerializeToString()).get_session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert onnx.__version__  # the graph above was built by the onnx package the export uses


def _openblas_corenames() -> dict[str, str]:
    """The core type each bundled OpenBLAS runs (scipy's and numpy's), from OpenBLAS itself."""
    import ctypes

    import numpy
    import scipy

    out = {}
    for pkg, symbol in (
        (scipy, "scipy_openblas_get_corename"),
        (numpy, "scipy_openblas_get_corename64_"),
    ):
        libs = sorted(
            (Path(pkg.__file__).parent.parent / f"{pkg.__name__}.libs").glob(
                "libscipy_openblas*.so*"
            )
        )
        if libs:
            get = getattr(ctypes.CDLL(str(libs[0])), symbol)
            get.restype = ctypes.c_char_p
            out[pkg.__name__] = get().decode()
    return out


def test_the_portable_run_pins_openblas_to_an_avx2_core():
    from numpy._core._multiarray_umath import __cpu_features__

    want = os.environ.get("OPENBLAS_CORETYPE")
    if not __cpu_features__.get("AVX2") or not want:
        pytest.skip("no AVX2 here, or no core type set: OpenBLAS keeps its own choice")
    names = _openblas_corenames()
    assert names, "found neither scipy's nor numpy's bundled OpenBLAS"
    assert {k: v.lower() for k, v in names.items()} == {k: want.lower() for k in names}
