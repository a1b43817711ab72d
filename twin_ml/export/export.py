"""A training run -> one parity-checked, self-describing ONNX file.

`export_run` rebuilds the trained ensemble (hash-checked), builds its rollout graph, checks
onnxruntime against torch on random in-domain scenarios (batch 1 and batch 64), measures the
fixed-step integrator against a tight adaptive solve, writes the manifest into the file's
metadata, and writes the file atomically. A failed parity check writes nothing.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_ml._io import sha256_bytes
from twin_ml._version import code_version
from twin_ml.contract import (
    ConformalShift,
    DomainBox,
    ModelCard,
    Normalization,
    Provenance,
    SystemCard,
    TimeGrid,
)
from twin_ml.data.design import ScenarioDesign
from twin_ml.data.generate import scenario_inputs
from twin_ml.export.onnx_export import ExportError, build_onnx, set_metadata
from twin_ml.models import load_trained
from twin_ml.models.surrogates import Emulator, FlowMap, LatentODE, Surrogate

PARITY_TOL = 1e-5  # max |onnxruntime - torch| in normalized output units (y / y_std)


def in_domain_scenarios(
    model: Surrogate, design: dict[str, Any], n: int, n_times: int, dt: float, seed: int
) -> dict[str, np.ndarray]:
    """n scenarios sampled inside the training design's box (its signals too), on n_times points."""
    fields = {k: v for k, v in design.items() if k not in ("box", "t_end", "dt")}
    d = ScenarioDesign(
        **{
            **fields,
            "extrapolation_fraction": 0.0,
            "calibration_fraction": 0.0,
            "t_end": dt * (n_times - 1),
            "dt": dt,
        }
    )
    scen = d.sample(model.system, n, seed)
    t = d.time_grid(model.system)
    u = scenario_inputs(t, d.signal_specs(model.system), scen, seed)
    return {"t": t, "x0": scen.x0, "u": u, "p": scen.p}


def training_design(system, meta: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The design a run was trained on (model.json's `design`), or for a run trained on
    telemetry, the box its records spanned: the parameters at the values training started from,
    the states over the range of the state table, every input over its measured range (sampled
    as a design samples it: offset within the range, amplitude up to half of it)."""
    if "design" in meta:
        return meta["design"]
    tel = meta.get("telemetry") or {}
    if not {"parameters", "state_ranges", "input_range"} <= set(tel):
        raise ExportError(
            f"{run_dir}/model/model.json has no training design (made by an older twin-train); "
            "train the run again"
        )
    design = ScenarioDesign(
        parameters={
            n: float(tel["parameters"].get(n, v))
            for n, v in zip(system.parameter_names, system.nominal_parameters)
        },
        states=dict(zip(system.state_names, map(tuple, tel["state_ranges"]))),
        inputs=dict(zip(system.input_names, map(tuple, tel["input_range"]))),
    )
    box = design.box(system)
    return {
        **design.to_dict(),
        "box": {n: [float(lo), float(hi)] for n, lo, hi in zip(box.names, box.low, box.high)},
    }


def _members_torch(model: Surrogate, s: dict[str, np.ndarray], dtype=torch.float32) -> np.ndarray:
    m = model.to(dtype)
    args = [torch.tensor(s[k], dtype=dtype) for k in ("x0", "u", "p")]
    with torch.no_grad():
        _, y = m(*args, torch.tensor(s["t"], dtype=dtype))
    return y.double().numpy()


def parity_check(
    model: Surrogate, onnx_bytes: bytes, s: dict[str, np.ndarray], *, tol: float = PARITY_TOL
) -> dict[str, Any]:
    """onnxruntime vs torch (float32) on the scenarios `s`, at batch 1 and batch 64.

    A scenario passes when max |onnx - torch| <= tol (normalized units), or when onnx is as close
    to the exact (float64) rollout as max(tol, 10x torch's own float32 error there): the graph
    computes the same function in a differently rounded float32 program (folded weights), and
    where the dynamics amplify round-off (a pendulum going over the top) no two float32 programs
    agree to tol. A wrong graph misses by orders of magnitude. "n_roundoff_limited" counts the
    scenarios whose float32 error alone exceeds tol / 2.
    """
    from twin_ml._ort import session

    sess = session(onnx_bytes)
    y_std = model.y_std.double().numpy()
    ref32 = _members_torch(copy.deepcopy(model), s, torch.float32)
    ref64 = _members_torch(copy.deepcopy(model), s, torch.float64)

    def per_scenario(a, b):  # [M, N, T, ny] -> [N]
        return (np.abs(a - b).max(axis=(0, 2)) / y_std).max(axis=-1)

    roundoff = per_scenario(ref32, ref64)
    feeds = {k: s[k].astype(np.float32) for k in ("x0", "u", "p")}
    out: dict[str, Any] = {"n_scenarios": int(len(s["p"])), "n_times": int(len(s["t"])), "tol": tol}
    ok = True
    for batch in (1, 64):
        got = []
        for i in range(0, len(s["p"]), batch):
            got.append(sess.run(["members"], {k: v[i : i + batch] for k, v in feeds.items()})[0])
        y = np.concatenate(got, axis=1).astype(np.float64)
        diff = per_scenario(y, ref32)
        ok_i = (diff <= tol) | (per_scenario(y, ref64) <= np.maximum(tol, 10.0 * roundoff))
        bad = np.flatnonzero(
            ~(ok_i & np.isfinite(diff))
        )  # NaN compares False: count it as a failure
        out[f"batch_{batch}"] = {
            "max_diff": float(diff.max()),
            "median_diff": float(np.median(diff)),
            "n_over_tol": int((diff > tol).sum()),
            "n_failed": int(len(bad)),
        }
        ok &= len(bad) == 0
    out["n_roundoff_limited"] = int((roundoff > tol / 2).sum())
    out["passed"] = bool(ok)
    return out


def integrator_error(
    model: Surrogate, s: dict[str, np.ndarray], n: int = 8
) -> dict[str, Any] | None:
    """The exported fixed-step rollout against a tight adaptive solve (dopri5, float64) of the
    same learned vector field, in normalized output units; None for emulators and flow maps."""
    if isinstance(model, Emulator | FlowMap) or model.solver == "exact":
        # one pass; a discrete map (its physics step is part of what the correction was trained
        # on); or the affine rom's exact step (matrix exponential): no integrator to measure
        return None
    sub = {k: (v[:n] if k != "t" else v) for k, v in s.items()}
    fixed = _members_torch(copy.deepcopy(model), sub, torch.float64)
    tight = copy.deepcopy(model)
    tight.solver, tight.rtol, tight.atol = "dopri5", 1e-8, 1e-10
    ref = _members_torch(tight, sub, torch.float64)
    err = np.abs(fixed - ref) / model.y_std.double().numpy()
    return {
        "method": f"{model.solver} x{model.substeps} per step",
        "reference": "dopri5 rtol 1e-8 (float64)",
        "n_scenarios": int(len(sub["p"])),
        "max": float(err.max()),
        "median": float(np.median(err)),
    }


def _filtered(model: Surrogate) -> bool:
    """Whether the file takes the members' own states and gives their end states (`x_members`,
    `x_end`: an ensemble filter's forecast): the state-space kinds, not the reduced or one-shot
    ones."""
    return not isinstance(model, (Emulator, LatentODE))


def _field_outputs(model: Surrogate) -> dict[str, list]:
    """A reduced-order model's field outputs: the decoded fields at the steps of the optional
    input `field_steps` [K] (default: none), ensemble mean and spread."""
    if not isinstance(model, LatentODE):
        return {}
    n = model.system.state_size
    return {"field_mean": ["batch", "fields", n], "field_std": ["batch", "fields", n]}


def export_run(
    run_dir: str | Path,
    *,
    name: str,
    version: str,
    max_steps: int | None = None,
    parity_scenarios: int = 100,
    parity_steps: int = 100,
    seed: int = 0,
) -> tuple[bytes, ModelCard]:
    """(ONNX bytes with the model card in its metadata, the card with the file's sha256) of the
    model in `run_dir`.

    Raises ExportError when the parity check fails (nothing is returned, nothing written)."""
    run_dir = Path(run_dir)
    model, meta = load_trained(run_dir / "model")
    meta = {**meta, "design": training_design(model.system, meta, run_dir)}
    time = meta["time"]
    dt, n_train = float(time["dt"]), int(time["n"])
    is_emulator = isinstance(model, Emulator)
    if is_emulator:
        max_steps = n_train - 1
    max_steps = int(4 * (n_train - 1) if max_steps is None else max_steps)
    if max_steps < 1:
        raise ExportError(f"max_steps must be >= 1, got {max_steps}")
    mp = build_onnx(copy.deepcopy(model), dt)
    n_times = n_train if is_emulator else min(parity_steps, max_steps) + 1
    s = in_domain_scenarios(model, meta["design"], parity_scenarios, n_times, dt, seed=seed + 7919)
    raw = mp.SerializeToString()
    parity = parity_check(model, raw, s)
    if not parity["passed"]:
        raise ExportError(
            f"parity check failed: onnxruntime and torch differ beyond {PARITY_TOL} "
            f"(normalized units): {json.dumps(parity)}"
        )
    card = ModelCard(
        name=name,
        version=version,
        kind=model.kind,
        members=model.members,
        system=SystemCard.model_validate(model.system.describe()),
        interface={
            "inputs": {
                "x0": ["batch", model.nx],
                "u": ["batch", "time", model.nu],
                "p": ["batch", model.n_p],
                **({"x_members": [model.members, "batch", model.nx]} if _filtered(model) else {}),
            },
            "outputs": {
                "members": [model.members, "batch", "time", model.ny],
                "mean": ["batch", "time", model.ny],
                "std": ["batch", "time", model.ny],
                **({"x_end": [model.members, "batch", model.nx]} if _filtered(model) else {}),
                **_field_outputs(model),
            },
            "dtype": "float32",
        },
        time=TimeGrid(
            t0=time["t0"],
            dt=dt,
            unit=time["unit"],
            train_steps=n_train - 1,
            max_steps=max_steps,
            fixed_steps=is_emulator,
        ),
        domain=DomainBox.of_design(meta["design"]),
        normalization=Normalization.model_validate(meta["config"]["stats"]),
        conformal_scale=meta["conformal_scale"],
        # beta 0 for runs trained before the conformal shift
        conformal_shift=ConformalShift.model_validate(meta.get("conformal_shift") or {}),
        metrics=meta.get("metrics", {}),
        parity=parity,
        integrator_error=integrator_error(model, s),
        provenance=Provenance(
            dataset_sha256=meta["dataset_sha256"],
            config_sha256=meta["config_sha256"],
            weights_sha256=meta["weights_sha256"],
            code_version=code_version(),
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        ),
    )
    set_metadata(mp, card)
    data = mp.SerializeToString()
    return data, card.model_copy(update={"onnx_sha256": sha256_bytes(data)})
