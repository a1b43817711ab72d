"""One place that opens onnxruntime sessions (torch-free): export's parity check, serving,
calibration and the tools all get the same options.

`TWIN_ML_ORT_OPT_LEVEL` (disable, basic, extended, all; default all, onnxruntime's own default)
sets the graph optimization level. The portable test run (`make test-portable`) sets it to basic:
no fused kernels, so the float32 results differ from the default run's in their last bits, and a
tolerance that only holds for one kernel choice fails there.
"""

from __future__ import annotations

import os
from pathlib import Path

OPT_LEVEL_ENV = "TWIN_ML_ORT_OPT_LEVEL"
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def session(source: str | Path | bytes, *, threads: int | None = None):
    """An onnxruntime CPU session on a file or on the model's bytes. threads: intra-op threads
    (None: onnxruntime's default, one per core); inter-op is always 1 (sequential graphs)."""
    import onnxruntime as ort

    level = os.environ.get(OPT_LEVEL_ENV) or "all"
    if level not in _LEVELS:
        raise ValueError(f"{OPT_LEVEL_ENV}={level!r} is not one of {', '.join(_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    if threads is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: a field model's optional input (its default) warns
    src = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
