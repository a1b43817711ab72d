"""The portable run (`make test-portable`, tests/run_portable.py) proves something only if its
narrowing took effect: checked here, inside that run, against each library's own report."""

import os

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
