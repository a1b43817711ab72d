"""Measured records as a model's arrays: telemetry (aligned under its contract) -> inputs u [T, nu]
and outputs y [T, ny] with their mask in a system's variable order, the state table multiple
shooting starts from, and the train/test records of a run (a real dataset or telemetry files,
read through the contract: its columns, units and timestamp section), checked against the contract
and the system. Only the contract's inputs and outputs reach the arrays: its extra signals are
ingested and reported, never used as outputs. A mask here is True where a sample is valid.
Torch-free (numpy, plus the scipy solver for the state table).

Used by training on telemetry (`twin_ml.train.telemetry`) and by monitoring (twin-monitor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml.data.telemetry import Contract, Telemetry


def record_outputs(system, contract: Contract, tel: Telemetry) -> tuple[np.ndarray, np.ndarray]:
    """y [T, ny], mask [T, ny] (True = valid) in the system's output order. Only the contract's
    outputs count: an output it lacks, or has only as an extra signal, is all masked."""
    y = np.zeros((len(tel.t), len(system.output_names)))
    mask = np.zeros_like(y, dtype=bool)
    outputs = contract.names("output")
    for j, name in enumerate(system.output_names):
        if name in outputs:
            v, ok = tel.signal(name)
            y[:, j], mask[:, j] = np.where(ok, v, 0.0), ok
    return y, mask


def record_inputs(system, tel: Telemetry) -> np.ndarray:
    """u [T, nu]; masked input points are filled by holding the last valid value (a model needs
    them)."""
    u = np.zeros((len(tel.t), len(system.input_names)))
    for j, name in enumerate(system.input_names):
        v, ok = tel.signal(name)
        if not ok.any():
            raise ValueError(f"telemetry: input {name!r} has no usable sample")
        s = np.where(ok, v, np.nan)
        idx = np.where(ok, np.arange(len(s)), 0)
        np.maximum.accumulate(idx, out=idx)
        filled = s[idx]
        filled[: np.argmax(ok)] = s[np.argmax(ok)]
        u[:, j] = filled
    return u


def record_arrays(system, contract: Contract, tel: Telemetry) -> dict[str, np.ndarray]:
    """{"t" (from 0), "u", "y", "mask"} of one record in the system's order."""
    y, mask = record_outputs(system, contract, tel)
    return {"t": tel.t - tel.t[0], "u": record_inputs(system, tel), "y": y, "mask": mask}


def state_table(
    system, t, u, y, mask, p, guess: dict[str, float], derivatives: dict[str, str] | None = None
) -> np.ndarray:
    """[T, nx]: the physics simulated along the record from a guessed start (hidden states), with
    the measured values in place for states that are measured outputs, and the central difference
    of a measured output for hidden states named in `derivatives` ({state: output})."""
    from twin_ml.physics import SolverSettings, solve_looped

    outs, states = system.output_names, system.state_names
    derivatives = dict(derivatives or {})
    for st, out in derivatives.items():
        if st not in states or out not in outs:
            raise ValueError(
                f"telemetry.derivatives: {st!r}: {out!r} must map a state ({', '.join(states)}) "
                f"to a measured output ({', '.join(outs)})"
            )
    x0 = np.array(
        [
            y[0, outs.index(s.name)]
            if s.name in outs and mask[0, outs.index(s.name)]
            else guess.get(s.name, 0.5 * (s.bounds[0] + s.bounds[1]))
            for s in system.states
        ]
    )
    if all(s.name in outs or s.name in derivatives for s in system.states):
        x = np.repeat(x0[None], len(t), axis=0)
        for i, s in enumerate(system.states):  # masked samples of a measured state: interpolated
            ok = mask[:, outs.index(s.name)] if s.name in outs else None
            if ok is not None and ok.sum() >= 2:
                x[:, i] = np.interp(t, t[ok], y[ok, outs.index(s.name)])
    else:  # an input interpolated between samples costs the adaptive solver steps at every sample
        res = solve_looped(
            system,
            t,
            u[None],
            p[None],
            x0[None],
            SolverSettings(max_rhs_evals=max(200_000, 200 * len(t))),
        )
        x = res.x[0] if res.status[0] == 0 else np.repeat(x0[None], len(t), axis=0)
        x = np.where(np.isfinite(x), x, x0[None])
    for st, out in derivatives.items():
        j = outs.index(out)
        ok = mask[:, j]
        filled = np.interp(t, t[ok], y[ok, j]) if ok.sum() >= 2 else np.zeros(len(t))
        x[:, states.index(st)] = np.gradient(filled, t)
    for i, s in enumerate(system.states):
        if s.name in outs:
            j = outs.index(s.name)
            x[:, i] = np.where(mask[:, j], y[:, j], x[:, i])
    return x


@dataclass
class Records:
    """The records of a run, ingested under the contract, with the sha256 of each one's source."""

    records: dict[str, Telemetry]
    contract: Contract
    sources: dict[str, str]  # record -> sha256 of its source file

    @property
    def sha256(self) -> str:
        """One hash of the sources (sorted), recorded as the run's dataset_sha256."""
        from twin_ml._io import sha256_bytes

        return sha256_bytes("".join(sorted(self.sources.values())).encode())


def check_contract(contract: Contract, system, name: str) -> None:
    """The contract's inputs must be the system's, in order, and its outputs among the system's."""
    if contract.names("input") != system.input_names:
        raise ValueError(
            f"telemetry.contract {name}: inputs {contract.names('input')} must be the "
            f"system's inputs {system.input_names}, in order"
        )
    unknown = set(contract.names("output")) - set(system.output_names)
    if unknown or not contract.names("output"):
        raise ValueError(
            f"telemetry.contract {name}: outputs {contract.names('output')} must be among "
            f"the system's outputs {system.output_names}"
        )


def load_records(
    system,
    contract: Contract,
    records: Sequence[str],
    *,
    dt: float,
    files: Mapping[str, str | Path] | None = None,
    dataset: str | None = None,
    real_dir: str | Path = "data/real",
    contract_name: str = "",
) -> Records:
    """The named records, from telemetry `files` ({record: path}) or a real `dataset` (its source
    file under real_dir/<dataset>/), checked against the contract and the system and ingested.

    `dt` must be the contract's sampling period. Errors name the telemetry setting at fault.
    """
    from twin_ml._io import sha256_file
    from twin_ml.data import real
    from twin_ml.data.telemetry import ingest, read_telemetry

    check_contract(contract, system, contract_name or contract.system)
    wanted = list(records)
    frames: dict[str, Any]
    if files:
        frames = {r: read_telemetry(f, contract=contract) for r, f in files.items() if r in wanted}
        source = {r: sha256_file(f) for r, f in files.items() if r in wanted}
    elif dataset:
        if dataset not in real.SOURCES:
            raise ValueError(
                f"telemetry.dataset={dataset!r} is unknown; known: {', '.join(real.SOURCES)}"
            )
        spec = real.SOURCES[dataset]
        frames = real.records(dataset, Path(real_dir) / dataset / spec["file"])
        source = {r: spec["sha256"] for r in frames}
    else:
        raise ValueError("telemetry: give dataset=<name> or files={record: path}")
    missing = [r for r in wanted if r not in frames]
    if missing:
        raise ValueError(f"telemetry: records {missing} not found; available: {', '.join(frames)}")
    if abs(contract.period_s - float(dt)) > 1e-9 * contract.period_s:
        raise ValueError(
            f"telemetry.dt ({dt}) must equal the contract's period ({contract.period_s})"
        )
    return Records(
        records={r: ingest(frames[r], contract) for r in wanted},
        contract=contract,
        sources=source,
    )
