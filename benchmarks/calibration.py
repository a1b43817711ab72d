"""Calibration benchmark: the surrogate in the loop against the solver in the loop, on synthetic
observations from the solver at known parameters with 1% noise (--noise; the issue's range is 1-2%)
and 5% of the points missing.

    python benchmarks/calibration.py [--out benchmarks/results/calibration.json] [--trials 40]
        [--noise 0.01] [--quick]

For each system (pendulum: hybrid, fitting length and damping; cascaded tanks: hybrid, k1 and k3;
Robertson, the stiff system: emulator, k1 and k3; heat_plate, the costly field system: the Galerkin
reduced-order model, conductivity k and convective coefficient h), in one run:
  1. trains the default experiment on the default 256-scenario dataset and exports it, when the
     model is not in the store under runs/bench-calibration/ (training time reported apart);
  2. point estimate: the same multi-start least squares (8 starts) with the surrogate, then with
     the solver (looped: one solve_ivp per candidate; and stacked: one vectorized solve per
     call): wall clock ratio, the parameter error (and the surrogate's before its corrections by
     the solver), and the solver's verification of the estimate. The ceiling: the looped solver's
     time over the surrogate's multi-start fit alone plus one solve, the most this path could gain
     if its corrections cost a single solve; and over the optimizer's own time in that fit (the fit
     less its model calls) plus one solve, the most any surrogate could gain with this optimizer;
     and one solve over one surrogate evaluation at its cheapest per scenario (batches of 1, 8, 64
     and 512 timed): both paths evaluate about as many points, so whatever the optimizer, the
     speedup stays under that ratio unless the surrogate path evaluates fewer. And, beside it, the
     surrogate's and the solver's parameter errors on the same problem with 2% noise (the other
     end of the issue's range);
  3. Bayesian: emcee on the surrogate (16 walkers, 200 steps, 66 burn-in, started from the
     Laplace approximation) with solver verification, over --trials seeded problems (different
     true values and noise): how often the 90% credible intervals hold the true values, and how
     many solver calls a whole Bayesian run used. Beside it, the solver's own intervals on the
     same trials (least squares with the solver, estimate +- 1.645 standard errors): what the trial
     set allows, since with 2 correlated parameters 40 trials leave the coverage uncertain by about
     +-0.05. On the first trial the same MCMC (settings and seed; started at the solver's own
     estimate) also runs with the looped solver in the loop, timed beside the surrogate's.
Writes one row per system with keys system, speedup, max_param_rel_error, verified (and more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _runs import generate, stored_model

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench-calibration"
OUT = ROOT / "benchmarks" / "results" / "calibration.json"
CASES = [
    ("pendulum", "pendulum_hybrid", ["length", "damping"]),
    ("cascaded_tanks", "cascaded_tanks_hybrid", ["k1", "k3"]),
    ("robertson", "robertson_emulator", ["k1", "k3"]),
    ("heat_plate", "heat_plate_rom", ["k", "h"]),
]
# a field system's solve costs ~0.4 s (heat_plate, 32 x 32): its Bayesian trials are capped (each
# trial's solver reference and verification cost ~30 s), and the solver's own MCMC (3200 solves,
# ~20 min) is not run; its cost is extrapolated from the measured time per solve like the others'
CASE_LIMITS = {"heat_plate": {"trials": 10, "solver_mcmc": False}}


def ensure_model(
    system: str, experiment: str, env: dict, n: int, epochs: int | None
) -> tuple[str, float | None]:
    data, run = (
        WORK / "data" / f"{system}-n{n}",
        WORK / f"runs-n{n}-e{epochs or 'default'}" / experiment,
    )
    if not (run / "model" / "model.json").exists() and not (data / "manifest.json").exists():
        generate(system, n, data, env)
    return stored_model(experiment, data, run, env, epochs)


def rel_error(estimate: dict, truth: dict) -> float:
    return max(abs(estimate[k] - v) / abs(v) for k, v in truth.items())


def per_scenario_ms(
    backend, problem, batches=(1, 8, 64, 512), seconds: float = 0.5
) -> dict[str, float]:
    """{batch: milliseconds per scenario} of backend.predict on random in-bounds candidates (the
    median of repeated calls over about `seconds` per batch size, after one warm-up call)."""
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        theta = problem.from_unit(rng.uniform(0.0, 1.0, (b, problem.n_fit)))
        backend.predict(problem, theta)
        times, t_end = [], time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            backend.predict(problem, theta)
            times.append(time.perf_counter() - t0)
        out[str(b)] = float(np.median(times)) * 1e3 / b
    return out


def bench_case(system: str, experiment: str, fit: list[str], env: dict, args) -> dict:
    from twin_ml import registry
    from twin_ml.calibrate import Problem, SolverBackend, SurrogateBackend, calibrate
    from twin_ml.calibrate.fit import point_estimate, posterior, starts
    from twin_ml.calibrate.synthetic import synthetic_request

    limits = CASE_LIMITS.get(system, {})
    args = argparse.Namespace(
        **{
            **vars(args),
            "trials": min(args.trials, limits.get("trials", args.trials)),
            "solver_mcmc": args.solver_mcmc and limits.get("solver_mcmc", True),
        }
    )
    ref, train_s = ensure_model(system, experiment, env, args.n, args.epochs)
    saved = WORK / f"runs-n{args.n}-e{args.epochs or 'default'}" / f"train_s-{experiment}.json"
    if train_s is None and saved.exists():
        train_s = json.loads(saved.read_text())["train_s"]
    path, card = registry.onnx_path(ref)
    request, truth = synthetic_request(card, fit, seed=args.seed, noise_level=args.noise)
    problem = Problem.build(request, card)
    row: dict = {
        "system": system,
        "model": ref,
        "kind": card.kind,
        "fit": fit,
        "truth": truth,
        "steps": len(problem.times) - 1,
        "train_s": train_s,
        "noise": args.noise,
    }

    # point estimate: the same optimizer and starts, surrogate vs solver (looped, stacked)
    sur = SurrogateBackend(path, card)
    res_s = calibrate(
        problem, sur, SolverBackend(card), n_starts=args.starts, mcmc=None, seed=args.seed
    )
    row["surrogate"] = {
        "estimate": res_s.estimate,
        "least_squares_s": res_s.timings.least_squares_s,
        "multistart_s": res_s.timings.multistart_s,
        "multistart_model_s": res_s.timings.multistart_model_s,
        "uncorrected_max_param_rel_error": rel_error(
            {k: e.uncorrected for k, e in res_s.estimates.items()}, truth
        ),
        "scenarios": res_s.evaluations.surrogate_scenarios,
        "solver_scenarios": res_s.evaluations.solver_scenarios,
        "verification": res_s.verification.as_dict(),
    }
    for mode in ("looped", "stacked"):
        solver = SolverBackend(card, mode=mode)
        res = calibrate(
            problem, None, solver, backend="solver", n_starts=args.starts, seed=args.seed
        )
        row[f"solver_{mode}"] = {
            "estimate": res.estimate,
            "least_squares_s": res.timings.least_squares_s,
            "scenarios": res.evaluations.solver_scenarios,
            "max_param_rel_error": rel_error(res.estimate, truth),
        }
    looped, with_surrogate = row["solver_looped"], row["surrogate"]
    row["speedup"] = looped["least_squares_s"] / with_surrogate["least_squares_s"]
    row["speedup_vs_stacked"] = (
        row["solver_stacked"]["least_squares_s"] / with_surrogate["least_squares_s"]
    )
    # ceilings against the looped solver's least squares: this surrogate's multi-start fit plus a
    # single solve (the least that a correction by the solver costs); and the same with a surrogate
    # that costs nothing (the optimizer's own time for the 8 starts, plus that solve)
    looped["s_per_solve"] = looped["least_squares_s"] / looped["scenarios"]
    row["speedup_ceiling_one_solve"] = looped["least_squares_s"] / (
        with_surrogate["multistart_s"] + looped["s_per_solve"]
    )
    row["speedup_ceiling_free_surrogate"] = looped["least_squares_s"] / (
        with_surrogate["multistart_s"]
        - with_surrogate["multistart_model_s"]
        + looped["s_per_solve"]
    )
    # the surrogate's cost per scenario, by batch size: with the same optimizer and starts both
    # paths evaluate about as many points, so one solve over one surrogate evaluation at its
    # cheapest (whichever batch size) bounds the speedup whatever the optimizer does
    with_surrogate["ms_per_scenario"] = per_scenario_ms(sur, problem)
    row["speedup_ceiling_per_evaluation"] = (
        looped["s_per_solve"] * 1e3 / min(with_surrogate["ms_per_scenario"].values())
    )
    row["max_param_rel_error"] = rel_error(res_s.estimate, truth)
    row["verified"] = res_s.verification.verified

    # the same problem with 2% noise: the parameter errors of the surrogate and of the solver itself
    req2, truth2 = synthetic_request(card, fit, seed=args.seed, noise_level=0.02)
    prob2 = Problem.build(req2, card)
    sur2 = calibrate(
        prob2,
        SurrogateBackend(path, card),
        SolverBackend(card),
        n_starts=args.starts,
        mcmc=None,
        seed=args.seed,
    )
    sol2 = calibrate(
        prob2,
        None,
        SolverBackend(card, mode="stacked"),
        backend="solver",
        n_starts=args.starts,
        seed=args.seed,
    )
    row["noise_0.02"] = {
        "max_param_rel_error": rel_error(sur2.estimate, truth2),
        "solver_max_param_rel_error": rel_error(sol2.estimate, truth2),
        "verified": sur2.verification.verified,
    }

    # Bayesian: coverage of the 90% credible intervals over seeded trials
    # beside it, the same trials' intervals from the solver itself (Laplace: least squares with the
    # solver, estimate +- 1.645 standard errors): a reference for what the trial set allows
    hits, total, solver_calls, accept, mcmc_s, mcmc_scen = 0, 0, [], [], [], []
    ref_hits, z_surrogate, z_solver = 0, [], []
    mcmc = {"steps": args.mcmc_steps, "burn": args.mcmc_steps // 3, "walkers": args.walkers}
    for trial in range(args.trials):
        req, tr = synthetic_request(card, fit, seed=1000 + trial, noise_level=args.noise)
        prob = Problem.build(req, card)
        solver = SolverBackend(card)
        res = calibrate(
            prob, SurrogateBackend(path, card), solver, n_starts=4, mcmc=mcmc, seed=trial
        )
        if (
            trial == 0 and args.solver_mcmc
        ):  # the same sampler and seed with the solver, from its own estimate
            best = point_estimate(
                SolverBackend(card, mode="stacked"), prob, prob.noise, starts(prob, 1, trial)
            )
            looped = SolverBackend(card)
            t0 = time.perf_counter()
            posterior(looped, prob, prob.noise, best.z, seed=trial, cov_z=best.cov_z, **mcmc)
            solver_s = time.perf_counter() - t0
            row["mcmc_solver"] = {
                "s": solver_s,
                "scenarios": looped.scenarios,
                "surrogate_s": res.timings.mcmc_s,
                "surrogate_scenarios": res.evaluations.surrogate_scenarios,
                "speedup": solver_s / res.timings.mcmc_s,
            }
        ref = calibrate(
            prob,
            None,
            SolverBackend(card, mode="stacked"),
            backend="solver",
            n_starts=1,
            seed=trial,
        )
        for k, v in tr.items():
            post = res.estimates[k].posterior
            hits += int(post.q05 <= v <= post.q95)
            total += 1
            z = (ref.estimates[k].value - v) / ref.estimates[k].std_error
            ref_hits += int(abs(z) <= 1.645)
            z_solver.append(z)
            z_surrogate.append((post.mean - v) / post.std)
        solver_calls.append(res.evaluations.solver_scenarios)
        accept.append(res.diagnostics.acceptance)
        mcmc_s.append(res.timings.mcmc_s)
        mcmc_scen.append(res.evaluations.surrogate_scenarios)
        print(
            f"  [{system}] trial {trial + 1}/{args.trials}: coverage so far {hits}/{total}",
            flush=True,
        )
    row["coverage90"] = hits / max(total, 1)
    row["coverage90_solver_laplace"] = ref_hits / max(total, 1)
    row["rms_z_surrogate"] = (
        float(np.sqrt(np.mean(np.square(z_surrogate)))) if z_surrogate else None
    )
    row["rms_z_solver_laplace"] = float(np.sqrt(np.mean(np.square(z_solver)))) if z_solver else None
    row["trials"] = args.trials
    row["bayesian_solver_calls_max"] = int(max(solver_calls)) if solver_calls else 0
    row["mcmc_acceptance_median"] = float(np.median(accept)) if accept else None
    row["mcmc_s_median"] = float(np.median(mcmc_s)) if mcmc_s else None
    # what the same MCMC would cost with the solver: its measured time per solve (the looped least
    # squares above) times the simulations the surrogate run made (an extrapolation, labelled so)
    per_solve = row["solver_looped"]["least_squares_s"] / row["solver_looped"]["scenarios"]
    if mcmc_s:
        row["mcmc_solver_s_extrapolated"] = per_solve * float(np.median(mcmc_scen))
        row["mcmc_speedup_extrapolated"] = row["mcmc_solver_s_extrapolated"] / row["mcmc_s_median"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--mcmc-steps", type=int, default=200)
    ap.add_argument("--walkers", type=int, default=16)
    ap.add_argument("--n", type=int, default=256, help="training scenarios per system")
    ap.add_argument("--epochs", type=int, default=None, help="override the experiments' max_epochs")
    ap.add_argument("--systems", default=",".join(c[0] for c in CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--noise", type=float, default=0.01, help="noise std as a fraction of each output's range"
    )
    ap.add_argument(
        "--solver-mcmc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the first trial's MCMC with the looped solver too (~2-4 min per system)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="64 scenarios, 5 epochs, 2 trials (a smoke run)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.trials, args.mcmc_steps, args.starts = 64, 5, 2, 200, 4
        args.solver_mcmc = False
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(WORK / ("store-quick" if args.quick else "store"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    env = dict(os.environ)
    wanted = args.systems.split(",")
    rows = []
    for system, experiment, fit in CASES:
        if system in wanted:
            print(f"[{system}] {experiment}, fitting {', '.join(fit)}", flush=True)
            rows.append(bench_case(system, experiment, fit, env, args))
    from twin_ml._io import atomic_write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, rows)
    print(
        "\n| system | model | steps | LS surrogate s | LS solver looped s | speedup | vs stacked "
        "| ceiling "
        "| ceiling, free surrogate | ceiling per evaluation | max param rel err | (uncorrected) "
        "| (solver looped) "
        "| at 2% noise: err "
        "| (solver) | verified | coverage90 | (solver Laplace) | trials | Bayesian solver calls "
        "| MCMC s "
        "| MCMC solver s (trial 0) | MCMC x solver | train s |"
    )
    print(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        two, ms = r["noise_0.02"], r.get("mcmc_solver")
        mcmc_solver = f"{ms['s']:.0f} vs {ms['surrogate_s']:.1f}" if ms else "-"
        mcmc_ratio = f"{ms['speedup']:.0f}" if ms else "-"
        print(
            f"| {r['system']} | {r['kind']} | {r['steps']} | "
            f"{r['surrogate']['least_squares_s']:.2f} | "
            f"{r['solver_looped']['least_squares_s']:.2f} | {r['speedup']:.1f} | "
            f"{r['speedup_vs_stacked']:.1f} | "
            f"{r['speedup_ceiling_one_solve']:.0f} | {r['speedup_ceiling_free_surrogate']:.0f} | "
            f"{r['speedup_ceiling_per_evaluation']:.0f} | "
            f"{r['max_param_rel_error']:.4f} | "
            f"{r['surrogate']['uncorrected_max_param_rel_error']:.4f} | "
            f"{r['solver_looped']['max_param_rel_error']:.4f} | "
            f"{two['max_param_rel_error']:.4f} | {two['solver_max_param_rel_error']:.4f} | "
            f"{r['verified']} | "
            f"{r['coverage90']:.2f} | {r['coverage90_solver_laplace']:.2f} | {r['trials']} | "
            f"{r['bayesian_solver_calls_max']} | {r.get('mcmc_s_median') or 0:.1f} | "
            f"{mcmc_solver} | {mcmc_ratio} | "
            f"{r['train_s'] if r['train_s'] is None else round(r['train_s'])} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
