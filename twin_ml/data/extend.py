"""Extending a dataset: rounds of added train scenarios, solved as the dataset was (torch-free).

Active learning (`twin_ml.active`) adds scenarios where a trained ensemble is least sure; this
module is its dataset side, which knows nothing of models: it rebuilds a dataset's system, design
and solver from its manifest (and refuses when this code no longer rebuilds the same settings),
draws candidate pools inside the design's box with the design's own sampler, and writes a round
of picked scenarios as new shards of the same format::

    1. plan     .extending.json: the round's record and its picked scenarios (design variables and
                the key of each one's input signal), written before anything is solved
    2. solve    shards/NNNNN.npz after the existing ones, the same shard size, each written to a
                temp file and renamed; a killed round resumes from the plan (the model is not
                needed again) and keeps the shards already written; solved as generation
                solves (in this process, a process pool, or Ray tasks: `executor`)
    3. commit   manifest.json rewritten at once (temp file, rename): the new shards and their
                sha256, the train split's new indices, counts, failures, dataset_sha256 over
                every shard, and the round appended to `rounds`; then the plan is removed

Until the commit the dataset reads as before (its manifest lists the old shards only). Added
scenarios join the train split only: val, test and extrapolation, and every existing shard, stay
byte for byte as they were, so accuracies before and after a round are comparable.

Seeds (the round's `seed` S, round number r, candidate j): the pool's design points from
SeedSequence([S, 5, r]), candidate j's input signal from SeedSequence([S, 6, r, j]); a picked
candidate keeps its signal (the one it was scored on).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml._io import atomic_write_json, remove_stale_temps
from twin_ml._version import code_version
from twin_ml.data.dataset import Dataset, DatasetError
from twin_ml.data.design import ScenarioDesign, Scenarios
from twin_ml.data.generate import (
    EXTENDING,
    MANIFEST,
    PROGRESS,
    SHARDS,
    check_executor,
    dataset_settings,
    dataset_sha256,
    read_json,
    scenario_inputs,
    shard_records,
    solve_shards,
)
from twin_ml.physics import SolverSettings, system_from_description

ACQUISITIONS = ("disagreement", "relative", "interval", "random")
PLAN_FORMAT = "twin-ml/extension-plan/v1"
_POOL, _SIGNAL = 5, 6  # SeedSequence streams of a round (generation uses 0-3)


@dataclass(frozen=True)
class Request:
    """What a round is asked to do; a round with the same request is done once (running the same
    command again resumes it, or finds it done).

    weights_sha256: the picking model's weights (None: `random`, no model)."""

    acquisition: str
    n_new: int
    seed: int
    pool_size: int
    min_distance: float | None
    weights_sha256: str | None

    def __post_init__(self):
        if self.acquisition not in ACQUISITIONS:
            raise ValueError(f"acquisition must be one of {ACQUISITIONS}, got {self.acquisition!r}")
        for name, v, lo in (("n_new", self.n_new, 1), ("seed", self.seed, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        p = self.pool_size
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < self.n_new:
            raise ValueError(
                f"pool_size must be an integer >= n_new ({self.n_new}): the candidates the "
                f"model scores to pick n_new from; got {p!r}"
            )
        d = self.min_distance
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < math.inf
        ):
            raise ValueError(f"min_distance must be a number >= 0 (box widths), got {d!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pool:
    """Candidate scenarios of one round: `scenarios` (in the box, labelled train), each one's
    input-signal key, and where each lies in the box ([P, d'] in [0, 1]:
    `DesignBox.coordinates`)."""

    scenarios: Scenarios
    keys: list[list[int]]
    coordinates: np.ndarray

    def __len__(self) -> int:
        return len(self.scenarios)


@dataclass
class ExtensionResult:
    """One round: the dataset, its manifest, the round's record (as `rounds` holds it), the
    shards written now and found from a killed run, and whether the round is committed."""

    path: Path
    manifest: dict[str, Any]
    record: dict[str, Any]
    shards_written: int
    shards_reused: int
    complete: bool
    seconds: float
    already_done: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dataset": str(self.path),
            "complete": self.complete,
            "already_done": self.already_done,
            "dataset_sha256": m.get("dataset_sha256") if self.complete else None,
            "system": m["system"]["name"],
            "counts": m.get("counts"),
            "round": self.record,
            "failures": self.failures[:50],
            "n_failures": len(self.failures),
            "shards_written": self.shards_written,
            "shards_reused": self.shards_reused,
            "seconds": round(self.seconds, 3),
        }


class DatasetExtension:
    """A complete dataset opened for extension: its system, design, solver and grid rebuilt from
    the manifest and checked (their settings hash must be the manifest's)."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not (path / MANIFEST).exists():
            why = (
                "its generation did not finish: run that twin-generate command again first"
                if (path / PROGRESS).exists()
                else "make one with twin-generate first"
            )
            raise ValueError(f"out_dir {str(path)!r} holds no complete dataset to extend ({why})")
        try:
            Dataset.open(path)  # every shard's hash
        except DatasetError as e:
            raise ValueError(f"out_dir: {e}") from None
        m = read_json(path / MANIFEST)
        self.manifest = m
        try:
            self.system = system_from_description(m["system"])
        except KeyError as e:
            raise ValueError(f"out_dir: {e.args[0] if e.args else e}") from None
        self.design = ScenarioDesign(**{k: v for k, v in m["design"].items() if k != "box"})
        self.solver = SolverSettings(**m["solver"]).resolved(self.system)
        self.t = self.design.time_grid(self.system)
        self.specs = self.design.signal_specs(self.system)
        self.box = self.design.box(self.system)
        self.stride = m.get("snapshot_stride")
        self.seed = int(m["seeds"]["seed"])
        self.shard_size = int(m["shard_size"])
        _, sha = dataset_settings(
            self.system,
            self.design,
            self.solver,
            n_scenarios=self.base_in_domain,
            seed=self.seed,
            shard_size=self.shard_size,
            stride=self.stride,
        )
        if sha != m["settings_sha256"]:
            raise ValueError(
                f"out_dir {str(path)!r}: this code (version {code_version()}) does not rebuild "
                f"the settings the dataset was made with (version {m.get('code_version')}): its "
                "system, design or solver declaration changed since; added scenarios would not "
                "be solved as the others were. Regenerate the dataset to extend it"
            )

    # ---- what the dataset holds ----------------------------------------------------------------
    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("rounds", []))

    @property
    def n_total(self) -> int:
        """Scenarios in the dataset (every split, failed ones too)."""
        return int(self.manifest["shapes"]["n_scenarios"])

    @property
    def base_in_domain(self) -> int:
        """The n_scenarios the dataset was generated with (train + val + test before any
        round)."""
        base_total = self.rounds[0]["index"][0] if self.rounds else self.n_total
        sp = self.manifest["splits"]
        return sum(int(i) < base_total for s in ("train", "val", "test") for i in sp.get(s, []))

    @property
    def next_round(self) -> int:
        return len(self.rounds) + 1

    @property
    def sha256(self) -> str:
        return self.manifest["dataset_sha256"]

    # ---- candidates ----------------------------------------------------------------------------
    def pool(self, n: int, seed: int, round_no: int | None = None) -> Pool:
        """n candidates for round `round_no` (default: the next), with the design's sampler."""
        r = self.next_round if round_no is None else round_no
        scen = self.design.candidates(self.system, n, key=[int(seed), _POOL, r])
        keys = [[int(seed), _SIGNAL, r, j] for j in range(n)]
        return Pool(scen, keys, self.box.coordinates(scen))

    def inputs(self, scen: Scenarios, keys: list[list[int]]) -> np.ndarray:
        """u [n, T, nu]: the input signals the scenarios will be solved with."""
        return scenario_inputs(self.t, self.specs, scen, self.seed, keys=keys)

    # ---- rounds --------------------------------------------------------------------------------
    def finished(self, request: Request) -> dict[str, Any] | None:
        """The committed round made by this very request, if there is one."""
        for rec in self.rounds:
            if rec.get("request") == request.to_dict():
                return rec
        return None

    def pending(self, request: Request, *, overwrite: bool = False) -> dict[str, Any] | None:
        """The plan of a round under way (killed before its commit) when it is this request's;
        None when there is none (or `overwrite` discarded another one). A plan of another request
        is refused: rounds are done one at a time."""
        remove_stale_temps(self.path)
        remove_stale_temps(self.path / SHARDS)
        f = self.path / EXTENDING
        plan = None
        if f.exists():
            try:
                plan = read_json(f)
            except ValueError:
                plan = None  # unreadable (cannot be: written atomically): start the round again
        if plan is not None and plan.get("base_dataset_sha256") != self.sha256:
            plan = None  # committed already (killed between the manifest and the plan's removal)
        if plan is not None and plan.get("request") != request.to_dict():
            if not overwrite:
                rec = plan.get("record", {})
                raise ValueError(
                    f"out_dir {str(self.path)!r}: round {rec.get('round')} "
                    f"(acquisition={rec.get('acquisition')}, n_new={rec.get('n_new')}, "
                    f"seed={rec.get('seed')}) was stopped before it finished; run that command "
                    "again to finish it, or pass overwrite=true to discard it"
                )
            plan = None
        if plan is not None and plan.get("code_version") != code_version():
            if not overwrite:
                raise ValueError(
                    f"out_dir {str(self.path)!r}: the round under way was started by code "
                    f"version {plan.get('code_version')}, this is {code_version()}; pass "
                    "overwrite=true to start it again"
                )
            plan = None
        if plan is None:
            self._discard()
        return plan

    def _discard(self) -> None:
        """Remove a stopped round's plan and the shards it wrote (files the manifest lacks)."""
        (self.path / EXTENDING).unlink(missing_ok=True)
        listed = {s["file"] for s in self.manifest["shards"]}
        for f in (self.path / SHARDS).glob("*.npz"):
            if f"{SHARDS}/{f.name}" not in listed:
                f.unlink()

    def plan(
        self,
        request: Request,
        pool: Pool,
        picked: np.ndarray,
        *,
        scores: np.ndarray | None = None,
        min_distance_used: float | None = None,
        model: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the round's plan: the `picked` candidates of `pool` (their order is the order of
        their new indices), and the round's record."""
        picked = np.asarray(picked, dtype=np.int64)
        if len(picked) != request.n_new or len(set(picked.tolist())) != len(picked):
            raise ValueError(f"picked: {request.n_new} distinct candidates, got {picked.tolist()}")
        scen = pool.scenarios
        rows = Scenarios(*(getattr(scen, k)[picked] for k in _SCEN_FIELDS))
        start = self.n_total
        record = {
            "round": self.next_round,
            "acquisition": request.acquisition,
            "n_new": request.n_new,
            "pool_size": len(pool),
            "seed": request.seed,
            "min_distance": request.min_distance,
            "min_distance_used": min_distance_used,
            "model": model,
            "index": [start, start + request.n_new],
            "shards": [
                f"{SHARDS}/{len(self.manifest['shards']) + k:05d}.npz"
                for k in range(math.ceil(request.n_new / self.shard_size))
            ],
            "picked": picked.tolist(),
            "scores": None if scores is None else _score_summary(scores, picked),
            "dataset_sha256_before": self.sha256,
            "request": request.to_dict(),
            "code_version": code_version(),
            "started_at": _now(),
        }
        plan = {
            "format": PLAN_FORMAT,
            "request": request.to_dict(),
            "base_dataset_sha256": self.sha256,
            "code_version": code_version(),
            "record": record,
            "scenarios": {k: getattr(rows, k).tolist() for k in _SCEN_FIELDS},
            "signal_keys": [pool.keys[i] for i in picked],
        }
        atomic_write_json(self.path / EXTENDING, plan)
        return plan

    def run(
        self,
        plan: dict[str, Any],
        *,
        workers: int = 1,
        progress: bool = True,
        max_new_shards: int | None = None,
        t0: float | None = None,
        executor: str = "local",
        ray_address: str | None = None,
    ) -> ExtensionResult:
        """Solve the plan's scenarios into their shards (keeping those a killed run wrote), then
        commit the round to the manifest (unless `max_new_shards` stopped it first).
        `workers`, `executor`, `ray_address`: who solves them, as in `generate_dataset` (the
        shards' bytes are the same whichever does)."""
        t0 = time.perf_counter() if t0 is None else t0
        check_executor(executor, ray_address, workers, reach=True)
        sc = plan["scenarios"]
        scen = Scenarios(
            *(
                np.asarray(sc[k], dtype=np.int8 if k == "split" else np.float64)
                for k in _SCEN_FIELDS
            )
        )
        record = dict(plan["record"])
        first = int(record["shards"][0].split("/")[-1].split(".")[0])
        shards = solve_shards(
            self.path,
            self.system,
            self.t,
            self.specs,
            scen,
            self.solver,
            seed=self.seed,
            shard_size=self.shard_size,
            stride=self.stride,
            start=int(record["index"][0]),
            first_shard=first,
            signal_keys=plan["signal_keys"],
            workers=workers,
            progress=progress,
            max_new_shards=max_new_shards,
            executor=executor,
            ray_address=ray_address,
        )
        if not shards.complete:
            return ExtensionResult(
                self.path,
                self.manifest,
                record,
                shards.written,
                shards.reused,
                False,
                time.perf_counter() - t0,
            )
        entries, failures = shard_records(self.path, shards.names, shards.bounds)
        m = dict(self.manifest)
        m["shards"] = [*m["shards"], *entries]
        new = list(range(*record["index"]))
        m["splits"] = {**m["splits"], "train": [*m["splits"].get("train", []), *new]}
        m["failures"] = [*m.get("failures", []), *failures]
        c = dict(m["counts"])
        c["train"] = c.get("train", 0) + len(new)
        c["total"] = c.get("total", 0) + len(new)
        c["ok"] = c.get("ok", 0) + len(new) - len(failures)
        c["failed"] = c.get("failed", 0) + len(failures)
        m["counts"] = c
        m["shapes"] = {**m["shapes"], "n_scenarios": int(m["shapes"]["n_scenarios"]) + len(new)}
        m["dataset_sha256"] = dataset_sha256(
            m["settings_sha256"], [s["sha256"] for s in m["shards"]]
        )
        record.update(failed=len(failures), dataset_sha256=m["dataset_sha256"], finished_at=_now())
        m["rounds"] = [*self.rounds, record]
        atomic_write_json(self.path / MANIFEST, m)  # the round is committed from here on
        (self.path / EXTENDING).unlink(missing_ok=True)
        self.manifest = m
        return ExtensionResult(
            self.path,
            m,
            record,
            shards.written,
            shards.reused,
            True,
            time.perf_counter() - t0,
            failures=failures,
        )

    def done_result(self, record: dict[str, Any], t0: float) -> ExtensionResult:
        """The result of a request whose round is already committed (nothing to do)."""
        return ExtensionResult(
            self.path, self.manifest, record, 0, 0, True, time.perf_counter() - t0, True
        )


_SCEN_FIELDS = ("p", "x0", "offset", "amplitude", "clip", "split")


def _score_summary(scores: np.ndarray, picked: np.ndarray) -> dict[str, Any]:
    """min / median / mean / max of the pool's and the picks' scores (non-finite ones: a model
    that diverged there, counted as the highest), and each pick's score."""

    def stats(a: np.ndarray) -> dict[str, Any]:
        fin = a[np.isfinite(a)]
        out: dict[str, Any] = {"n": int(a.size), "non_finite": int(a.size - fin.size)}
        for name, f in (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max)):
            out[name] = float(f(fin)) if fin.size else None
        return out

    scores = np.asarray(scores, dtype=np.float64)
    each = [float(v) if np.isfinite(v) else None for v in scores[picked]]
    return {"pool": stats(scores), "picked": stats(scores[picked]), "each": each}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
