"""twin-calibrate: fit physics parameters of a stored model's system to observations, with the
surrogate in the loop, checked by the solver.

    twin-calibrate model=NAME:REF observations=obs.json [out_dir=runs/calibrate] [backend=surrogate]
                   [mcmc=true] [steps=1000] [burn=300] [walkers=32] [starts=8] [max_nfev=60]
                   [verify_samples=8] [corrections=2] [correction_tol=0.1] [refine=0]
                   [solver_mode=looped] [seed=0]

  observations    a JSON file: times, outputs (null = missing), inputs, fit, and optionally
                  parameters, initial_state, bounds (default: the training domain), priors, noise
                  (per-output std; missing: estimated). See twin_ml/calibrate/problem.py.
  backend         surrogate (the model's ONNX file in onnxruntime) or solver (the same optimizer
                  and starts with the physics solver in the loop, for comparison; no MCMC)
  mcmc            posterior samples with emcee on the surrogate (steps, burn, walkers)
  corrections     solver simulations that correct the surrogate's output near the optimum, each
                  followed by a refit on the corrected surrogate (0: the surrogate alone)
  correction_tol  the corrections end at a round whose correction would move the estimate by at
                  most this many standard errors (first order): the surrogate already agrees with
                  the solver there, and that one solve verifies the estimate (0: every round)
  refine          solver-in-the-loop least-squares evaluations started from the surrogate's optimum
  solver_mode     looped (one solve_ivp per candidate) or stacked (one vectorized solve per call)

Writes calibration.json and calibration.png in out_dir and prints the JSON's path last. Every
warning in the JSON's "warnings" (MCMC diagnostics outside their accepted range, an unverified
estimate and why, bounds outside the training domain) is also printed on stderr as `warning: ...`.
Settings are key=value (not a Hydra app: `model` names a config group there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from training._common import Setting, defaults, fail, key_values

SETTINGS = {
    "model": Setting(None, "the stored model: NAME:VERSION, NAME:latest or NAME:<stage>", True),
    "observations": Setting(None, "the calibration request, a JSON file (see above)", True),
    "out_dir": Setting("runs/calibrate", "where calibration.json and calibration.png go"),
    "backend": Setting("surrogate", "surrogate (onnxruntime) or solver (physics in the loop)"),
    "mcmc": Setting("true", "posterior samples with emcee on the surrogate"),
    "steps": Setting("1000", "MCMC steps per walker"),
    "burn": Setting("300", "MCMC steps dropped at the start of each chain"),
    "walkers": Setting("32", "MCMC walkers"),
    "starts": Setting("8", "least-squares starts: the bounds' centre, then scrambled Sobol points"),
    "max_nfev": Setting("60", "model evaluations per least-squares start"),
    "verify_samples": Setting("8", "posterior samples the solver simulates to verify the fit"),
    "corrections": Setting("2", "solver corrections of the surrogate near the optimum, each refit"),
    "correction_tol": Setting("0.1", "end the corrections below this shift (standard errors)"),
    "refine": Setting("0", "solver-in-the-loop evaluations from the surrogate's optimum"),
    "solver_mode": Setting("looped", "looped (one solve_ivp per candidate) or stacked"),
    "seed": Setting("0", "seed of the starts, the MCMC and the verification samples"),
}
DEFAULTS = defaults(SETTINGS)
INTS = (
    "steps",
    "burn",
    "walkers",
    "starts",
    "max_nfev",
    "verify_samples",
    "corrections",
    "refine",
    "seed",
)


def parse(argv: list[str]) -> dict:
    cfg = key_values(argv, SETTINGS, __doc__)
    for key in ("model", "observations"):
        if not cfg[key]:
            raise ValueError(f"{key}=... is required")
    for key in INTS:
        if not str(cfg[key]).isdigit():
            raise ValueError(f"{key} must be an integer >= 0, got {cfg[key]!r}")
        cfg[key] = int(cfg[key])
    raw = cfg["correction_tol"]
    try:
        cfg["correction_tol"] = float(raw)
    except ValueError:
        cfg["correction_tol"] = float("nan")  # refused below, with the others
    if not 0 <= cfg["correction_tol"] < float("inf"):
        raise ValueError(f"correction_tol must be a number >= 0 (standard errors), got {raw!r}")
    if cfg["starts"] < 1 or cfg["steps"] < 1:
        raise ValueError("starts and steps must be >= 1")
    if cfg["backend"] not in ("surrogate", "solver"):
        raise ValueError(f"backend must be surrogate or solver, got {cfg['backend']!r}")
    if cfg["solver_mode"] not in ("looped", "stacked"):
        raise ValueError(f"solver_mode must be looped or stacked, got {cfg['solver_mode']!r}")
    if cfg["steps"] - cfg["burn"] < 20:
        raise ValueError(
            f"burn must leave at least 20 steps (steps={cfg['steps']}, burn={cfg['burn']})"
        )
    if cfg["mcmc"] not in ("true", "false"):
        raise ValueError(f"mcmc must be true or false, got {cfg['mcmc']!r}")
    cfg["mcmc"] = cfg["mcmc"] == "true"
    return cfg


def run(cfg: dict) -> Path:
    from twin_ml import registry
    from twin_ml._io import atomic_write_json
    from twin_ml.calibrate import Problem, SolverBackend, SurrogateBackend, calibrate
    from twin_ml.calibrate.report import plot

    onnx_path, card = registry.onnx_path(cfg["model"])
    obs_path = Path(cfg["observations"])
    if not obs_path.is_file():
        raise ValueError(f"observations: no such file {obs_path}")
    try:
        request = json.loads(obs_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"observations: {obs_path} is not valid JSON ({e})") from None
    problem = Problem.build(request, card)
    surrogate = SurrogateBackend(onnx_path, card)
    solver = SolverBackend(card, mode=cfg["solver_mode"])
    mcmc = (
        {"steps": cfg["steps"], "burn": cfg["burn"], "walkers": cfg["walkers"]}
        if cfg["mcmc"]
        else None
    )
    result = calibrate(
        problem,
        surrogate,
        solver,
        backend=cfg["backend"],
        n_starts=cfg["starts"],
        max_nfev=cfg["max_nfev"],
        mcmc=mcmc,
        verify_samples=cfg["verify_samples"],
        refine_nfev=cfg["refine"],
        corrections=cfg["corrections"],
        correction_tol=cfg["correction_tol"],
        seed=cfg["seed"],
    )
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    plot(problem, result, out / "calibration.png")
    body = result.as_dict()
    body.update(
        model=card.ref,
        system=card.system.name,
        observations=str(obs_path),
        plot=str(out / "calibration.png"),
    )
    atomic_write_json(out / "calibration.json", body)
    return out / "calibration.json"


def main(argv: list[str] | None = None) -> None:
    from twin_ml import registry

    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        path = run(cfg)
    except (ValueError, KeyError, registry.RegistryError, OSError) as e:
        # KeyError: the model's system cannot be found (its module is not importable from here);
        # OSError: e.g. a full disk; ValueError includes every request error
        fail(e)
    result = json.loads(path.read_text())
    for k in result["fit"]:
        post = result.get("posterior", {}).get(k)
        band = f"  90% [{post['q05']:.5g}, {post['q95']:.5g}]" if post else ""
        print(f"{k:>12} = {result['estimate'][k]:.6g} +- {result['std_error'][k]:.2g}{band}")
    ver = result.get("verification")
    if ver:
        lo, hi = ver["rms_residual_band"]
        print(
            f"solver verification: {'verified' if ver['verified'] else 'UNVERIFIED'} "
            f"({100 * ver['within_2std'][0]:.0f}% of points within 2 std of the surrogate; "
            f"the solver's RMS normalized residual {ver['rms_residual_solver'][0]:.3g}, "
            f"accepted {lo:.2g}-{hi:.2g})"
        )
    # every warning (the problem's, MCMC diagnostics, why verification failed) on stderr, one a
    # line: stdout stays the estimates and, last, the JSON's path for scripts
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    ev, tm = result["evaluations"], result["timings"]
    print(
        f"{ev['surrogate_scenarios']} surrogate / {ev['solver_scenarios']} solver simulations, "
        f"{tm['total_s']:.1f} s"
    )
    print(path)


if __name__ == "__main__":
    main()
