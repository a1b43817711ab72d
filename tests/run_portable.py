"""`make test-portable`: the numeric tests (marker `numeric`) once more, on the narrowest SIMD paths
this CPU offers, so that a tolerance that only holds for one CPU's kernels fails here and not on
a user's machine. Arguments are passed on to pytest.

    python tests/run_portable.py -q -n 2 --dist loadfile

Narrowed, each where its library reads it at start-up:
- numpy: its AVX-512 dispatch targets off (NPY_DISABLE_CPU_FEATURES, the ones this CPU has);
- torch: ATEN_CPU_CAPABILITY=default (no AVX2/AVX-512 kernels), MKL and oneDNN at most AVX2;
- OpenBLAS (scipy): OPENBLAS_CORETYPE=Haswell, where the CPU has AVX2 and none is set already;
- onnxruntime: graph optimizations at basic (TWIN_ML_ORT_OPT_LEVEL, read by twin_ml/_ort.py).
tests/test_portable.py checks, inside that run, that each of these took effect.

Unless paths are given, only the test files that mark a test `numeric` are collected (the text
`mark.numeric`: a decorator, a `pytestmark`, a `pytest.param(marks=...)`): collecting the others
imports them on every worker and selects nothing from them (10 s against 4 s per process).
"""

import os
import sys
from pathlib import Path

from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

wide = [
    d for d in __cpu_dispatch__ if d.startswith(("AVX512", "X86_V4")) and __cpu_features__.get(d)
]
env = {
    **os.environ,
    "NPY_DISABLE_CPU_FEATURES": ",".join(wide),
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "TWIN_ML_ORT_OPT_LEVEL": "basic",
    "TWIN_ML_PORTABLE_RUN": "1",
}
if __cpu_features__.get("AVX2") and not os.environ.get("OPENBLAS_CORETYPE"):
    env["OPENBLAS_CORETYPE"] = "Haswell"  # a core type whose kernels need only AVX2
print(
    f"portable run: numpy without {','.join(wide) or 'nothing (no AVX-512 here)'}; torch at its "
    "default kernels; onnxruntime optimizations at basic",
    flush=True,
)
args = sys.argv[1:]
if not any(Path(a.split("::")[0]).exists() for a in args if not a.startswith("-")):
    here = Path(__file__).resolve().parent
    args += sorted(
        str(f) for f in here.glob("test_*.py") if "mark.numeric" in f.read_text(encoding="utf-8")
    )
os.execve(sys.executable, [sys.executable, "-m", "pytest", "-m", "numeric", *args], env)
