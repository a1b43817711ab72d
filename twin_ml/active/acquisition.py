"""Active learning: extend a dataset with solver runs where a trained ensemble is least sure.

One round (`extend_dataset`, what `twin-generate n_new=K extend_from=RUN` runs):

1. a pool of candidates inside the dataset's design box, drawn with the design's own sampler
   (`DatasetExtension.pool`: parameters, initial states and input signals exactly as the design
   makes them);
2. each candidate predicted by the run's ensemble (batched, no solver) and scored
   (`score_candidates`): `disagreement`, the members' spread, `relative`, that spread over the
   size of the predicted trajectory (the ensemble's own estimate of the scenario's relative L2
   error, the accuracy metric the benchmarks score), or `interval`, the width of the calibrated
   90% interval (the spread plus the learned noise, times the conformal scale);
3. the K best kept apart in the box (`select_diverse`), then solved and committed as a new round
   of the dataset's train split (`twin_ml.data.extend`).

`random` skips 2 and 3: the design's sampler draws K scenarios, what a fresh design would add,
with no model: the baseline to compare a model's picks with at the same K.

Why a greedy distance guard and not k-means of the top candidates: it is deterministic (no
clustering seed or iterations), it keeps exactly the highest-scored candidates that are not near
duplicates of a better one, and a region that truly is uncertain still gets several picks. Batch
picks by score alone crowd into one spot: neighbours of a high-scoring candidate score high too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml.data.extend import ACQUISITIONS, DatasetExtension, ExtensionResult, Request
from twin_ml.uq.metrics import central_z

MIN_POOL = 256  # the default pool: 32 candidates per pick, at least this many
POOL_PER_PICK = 32


def default_pool_size(n_new: int) -> int:
    return max(MIN_POOL, POOL_PER_PICK * int(n_new))


def score_candidates(
    model,
    t: np.ndarray,
    x0: np.ndarray,
    u: np.ndarray,
    p: np.ndarray,
    acquisition: str,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """Scores [N] of scenarios x0 [N, nx], u [N, T, nu], p [N, np] on the grid t [T] (higher:
    more worth a solver run), each a mean over steps and outputs in units of each output's
    training std (`model.y_std`):

    - disagreement: the ensemble members' std (epistemic only; needs >= 2 members);
    - relative: ||members' std|| / ||ensemble mean|| over steps and outputs, in the outputs' own
      units (not a mean of std units): the relative L2 error the ensemble expects there. It
      favours scenarios whose trajectory is small where disagreement does not (a nearly empty
      tank, a pendulum at rest: a small absolute error is a large relative one); needs >= 2
      members;
    - interval: the calibrated 90% interval's width, 2 z std with the model's std (members'
      spread and learned noise, times the conformal scale).

    A candidate whose prediction is not finite (a member that diverged there) scores +inf.
    """
    import torch

    if acquisition not in ("disagreement", "relative", "interval"):
        raise ValueError(
            "acquisition must be disagreement, relative or interval to score candidates, got "
            f"{acquisition!r}"
        )
    if acquisition in ("disagreement", "relative") and model.members < 2:
        raise ValueError(
            f"acquisition={acquisition} needs an ensemble of >= 2 members; the run has "
            f"{model.members}: use acquisition=interval"
        )
    z = central_z(0.9)
    tt = torch.tensor(np.asarray(t), dtype=torch.float32)
    scale = model.y_std
    out = []
    for s in range(0, len(p), batch_size):
        sl = slice(s, s + batch_size)
        args = (torch.tensor(np.asarray(a[sl]), dtype=torch.float32) for a in (x0, u, p))
        pred = model.predict(*args, tt)  # no_grad; mean/std [B, T, ny], members [M, B, T, ny]
        if acquisition == "relative":
            spread = pred["members"].double().std(dim=0, unbiased=False)
            size = torch.linalg.vector_norm(pred["mean"].double(), dim=(1, 2))
            rel = torch.linalg.vector_norm(spread, dim=(1, 2)) / size.clamp_min(1e-12)
            out.append(rel.numpy())
            continue
        if acquisition == "disagreement":
            spread = pred["members"].std(dim=0, unbiased=False)
        else:
            spread = 2.0 * z * pred["std"]
        out.append((spread / scale).mean(dim=(1, 2)).double().numpy())
    scores = np.concatenate(out) if out else np.zeros(0)
    return np.where(np.isfinite(scores), scores, np.inf)


def select_diverse(
    scores: np.ndarray, coordinates: np.ndarray, k: int, min_distance: float
) -> tuple[np.ndarray, float]:
    """The indices of k candidates by descending score, skipping one whose RMS distance (per
    dimension, in box widths: `coordinates` [N, d] in [0, 1]) to an already picked one is below
    `min_distance`; when fewer than k pass, the distance is halved (down to 0) and the pass goes
    on. Returns (indices [k], the distance the last pick needed).

    >>> select_diverse(np.array([3.0, 2.9, 1.0]), np.array([[0.0], [0.01], [1.0]]), 2, 0.1)
    (array([0, 2]), 0.1)
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the candidates), got {k}")
    order = np.argsort(-scores, kind="stable")
    pts = np.asarray(coordinates, dtype=np.float64).reshape(n, -1)
    d = max(pts.shape[1], 1)
    picked: list[int] = []
    nearest = np.full(n, np.inf)  # each candidate's RMS distance to the nearest pick
    thr = float(min_distance)
    while True:
        for i in order:
            if len(picked) == k:
                break
            if nearest[i] >= thr and i not in picked:
                picked.append(int(i))
                nearest = np.minimum(nearest, np.sqrt(((pts - pts[i]) ** 2).sum(axis=1) / d))
        if len(picked) == k:
            return np.array(picked), thr
        thr = thr / 2.0 if thr > 1e-6 else 0.0


def run_model(extend_from: str | Path):
    """(model, meta) of a twin-train run directory (its model/); errors name extend_from."""
    from twin_ml.models.surrogates import load_trained

    run = Path(extend_from)
    model_dir = run / "model" if (run / "model").is_dir() else run
    try:
        return load_trained(model_dir)
    except ValueError as e:
        raise ValueError(f"extend_from={str(run)!r}: {e}") from None


def check_run(model, meta: dict[str, Any], ext: DatasetExtension, extend_from: str) -> None:
    """The run must model this dataset's system (name and options) on its time grid."""
    got = model.system.reference()
    want = ext.manifest["system"]
    if (got["name"], got["options"]) != (want["name"], want.get("options", {})):
        raise ValueError(
            f"extend_from={extend_from!r} was trained on system {got['name']} "
            f"{json.dumps(got['options'])}; the dataset in out_dir is {want['name']} "
            f"{json.dumps(want.get('options', {}))}: pick a run trained on this dataset's system"
        )
    tm = meta.get("time", {})
    dt = float(ext.t[1] - ext.t[0])
    if int(tm.get("n", -1)) != len(ext.t) or not math.isclose(
        float(tm.get("dt", math.nan)), dt, rel_tol=1e-9
    ):
        raise ValueError(
            f"extend_from={extend_from!r} predicts {tm.get('n')} steps of {tm.get('dt')}; the "
            f"dataset in out_dir has {len(ext.t)} steps of {dt}: pick a run trained on this "
            "dataset's time grid"
        )


def extend_dataset(
    out_dir: str | Path,
    *,
    n_new: int,
    acquisition: str = "disagreement",
    extend_from: str | Path | None = None,
    seed: int = 0,
    pool_size: int | None = None,
    min_distance: float = 0.1,
    batch_size: int = 256,
    workers: int = 1,
    max_new_shards: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
) -> ExtensionResult:
    """Add one round of `n_new` solver runs to the train split of the dataset in `out_dir`.

    acquisition: `disagreement`, `relative` or `interval` (the run `extend_from` scores `pool_size`
    candidates, default 32 per pick and at least 256; picks keep `min_distance` RMS box widths
    apart), or `random` (the design's sampler draws n_new; no model, no pool).
    seed: the round's pool and signals. Running the same request again resumes a killed round or,
    once committed, does nothing; a stopped round of another request is refused unless
    `overwrite` (which discards it).
    executor, ray_address: where the new shards are solved (`twin_ml.data.generate_dataset`).
    """
    from twin_ml.data.generate import check_executor

    t0 = time.perf_counter()
    # before the candidates are scored and the plan written: a bad executor, or nothing
    # answering at ray_address, fails at once
    check_executor(executor, ray_address, workers, reach=True)
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {ACQUISITIONS}, got {acquisition!r}")
    if acquisition != "random" and extend_from is None:
        raise ValueError(
            f"acquisition={acquisition} needs extend_from=<a twin-train run directory> (its "
            "ensemble picks the scenarios); acquisition=random needs no model"
        )
    if isinstance(n_new, bool) or not isinstance(n_new, (int, np.integer)) or n_new < 1:
        raise ValueError(f"n_new must be an integer >= 1, got {n_new!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if acquisition == "random":
        pool_size, min_distance_req = int(n_new), None
    else:
        pool_size = default_pool_size(n_new) if pool_size is None else pool_size
        min_distance_req = min_distance
    ext = DatasetExtension(out_dir)
    model = meta = None
    if extend_from is not None:
        model, meta = run_model(extend_from)
        check_run(model, meta, ext, str(extend_from))
    request = Request(
        acquisition=acquisition,
        n_new=n_new,
        seed=seed,
        pool_size=pool_size,
        min_distance=min_distance_req,
        weights_sha256=meta["weights_sha256"] if meta else None,
    )
    done = ext.finished(request)
    if done is not None:
        return ext.done_result(done, t0)
    plan = ext.pending(request, overwrite=overwrite)
    if plan is None:
        pool = ext.pool(request.pool_size, request.seed)
        scores, used = None, None
        if acquisition == "random":
            picked = np.arange(n_new)
        else:
            u = ext.inputs(pool.scenarios, pool.keys)
            sc = pool.scenarios
            scores = score_candidates(
                model, ext.t, sc.x0, u, sc.p, acquisition, batch_size=batch_size
            )
            picked, used = select_diverse(scores, pool.coordinates, n_new, float(min_distance))
        info = None
        if meta is not None:
            info = {
                "run": str(extend_from),
                "weights_sha256": meta["weights_sha256"],
                "kind": model.kind,
                "members": model.members,
                "trained_on_dataset_sha256": meta.get("dataset_sha256"),
            }
        plan = ext.plan(request, pool, picked, scores=scores, min_distance_used=used, model=info)
    return ext.run(
        plan,
        workers=workers,
        progress=progress,
        max_new_shards=max_new_shards,
        t0=t0,
        executor=executor,
        ray_address=ray_address,
    )
