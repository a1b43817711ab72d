"""twin-calibrate: fit physics parameters to observations, with a stored model's surrogate in the
loop and checked by the solver, or with the physics solver alone.

    twin-calibrate model=NAME:REF observations=obs.json [out_dir=runs/calibrate]
    twin-calibrate backend=solver system=cascaded_tanks observations=runs/ingest fit=k1,k3
                   parameters=k2:0.05,k4:0.025,k5:0.5 initial_state=h1:4,h2:3
    [mcmc=false] [steps=1000] [burn=300] [walkers=32] [likelihood=ar1] [mcmc_seconds=]
    [starts=8] [max_nfev=60] [verify_samples=8] [corrections=2] [correction_tol=0.1] [refine=0]
    [solver_mode=looped] [seed=0]

  observations    a JSON calibration request (times, outputs (null = missing), inputs, fit, and
                  optionally parameters, initial_state, bounds (default: the training domain),
                  priors, noise (per-output std; missing: estimated); see
                  twin_ml/contract/requests.py), or twin-ingest's output (its out_dir, or its
                  telemetry.parquet): times from the grid, outputs from the output signals
                  (invalid samples: missing), inputs from the input signals (invalid samples hold
                  the last valid value); other signals are ignored with a note
  request         a JSON or YAML file with the rest of the request: fit, parameters,
                  initial_state, bounds, priors, noise
  fit, parameters, initial_state, bounds, priors, noise
                  the same inline: fit=k1,k3  parameters=k2:0.05,k4:0.025  initial_state=h1:4
                  bounds=k1:0.04:0.06  priors=k3:0.05:0.003 (mean:std)  noise=h2:0.05;
                  a name:value here overrides the request file's, which overrides the JSON's
  outputs         the measured outputs that enter the fit (default: all; the others are ignored)
  backend         surrogate (the model's ONNX file in onnxruntime; model= required) or solver
                  (the same optimizer and starts with the physics solver in the loop; no MCMC):
                  with model=, the model's system, grid and training domain; without, system=
                  (a registered name or pkg.module:Class), the observations' own grid, and the
                  bounds the system declares
  mcmc            posterior samples with emcee on the surrogate (opt-in): at most steps per
                  walker (the chain stops once converged), burn, walkers, likelihood (ar1: AR(1)
                  correlated residuals per output; white: independent points), mcmc_seconds (a
                  wall-time budget); the defaults are POST /calibrate's
  corrections     solver simulations that correct the surrogate's output near the optimum, each
                  followed by a refit on the corrected surrogate (0: the surrogate alone)
  correction_tol  the corrections end at a round whose correction would move the estimate by at
                  most this many standard errors (first order): the surrogate already agrees with
                  the solver there, and that one solve verifies the estimate (0: every round)
  refine          solver-in-the-loop least-squares evaluations started from the surrogate's optimum
  solver_mode     looped (one solve_ivp per candidate) or stacked (one vectorized solve per call)

The whole request is checked before the first model or solver call (errors name the field).
Writes calibration.json and calibration.png in out_dir and prints the JSON's path last. Every
warning in the JSON's "warnings" (notes on the telemetry's signals, MCMC diagnostics outside their
accepted range, an unverified estimate and why, bounds outside the training domain) is also
printed on stderr as `warning: ...`. Settings are key=value (not a Hydra app: `model` names a
config group there).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from training._common import Setting, defaults, fail, key_values
from twin_ml.calibrate.fit import MCMC_DEFAULTS, NOISE_MODELS

SETTINGS = {
    "model": Setting(None, "the stored model: NAME:VERSION, NAME:latest or NAME:<stage>"),
    "system": Setting(None, "backend=solver without a model: a system name or pkg.module:Class"),
    "observations": Setting(None, "a JSON request, or twin-ingest's output (see above)", True),
    "request": Setting(None, "JSON/YAML: fit, parameters, initial_state, bounds, priors, noise"),
    "fit": Setting(None, "the fitted names, comma-separated (state:<name> for initial states)"),
    "parameters": Setting(None, "values of the parameters not fitted: name:value,..."),
    "initial_state": Setting(None, "initial states not fitted: name:value,..."),
    "bounds": Setting(None, "name:low:high,... (default: training domain / declared ranges)"),
    "priors": Setting(None, "normal priors: name:mean:std,..."),
    "noise": Setting(None, "per-output noise std: name:std,... (missing: estimated)"),
    "outputs": Setting(None, "the measured outputs that enter the fit, comma-separated (all)"),
    "out_dir": Setting("runs/calibrate", "where calibration.json and calibration.png go"),
    "backend": Setting("surrogate", "surrogate (onnxruntime) or solver (physics in the loop)"),
    "mcmc": Setting("false", "posterior samples with emcee on the surrogate (opt-in)"),
    "steps": Setting(str(MCMC_DEFAULTS["steps"]), "MCMC steps per walker, at most"),
    "burn": Setting(str(MCMC_DEFAULTS["burn"]), "MCMC steps dropped at the start of each chain"),
    "walkers": Setting(str(MCMC_DEFAULTS["walkers"]), "MCMC walkers"),
    "likelihood": Setting(MCMC_DEFAULTS["noise_model"], "MCMC's noise model: ar1 or white"),
    "mcmc_seconds": Setting(
        None if MCMC_DEFAULTS["max_seconds"] is None else str(MCMC_DEFAULTS["max_seconds"]),
        "MCMC's wall-time budget in seconds (unset: none)",
    ),
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
# the request's keys besides the observations (times, outputs, inputs), settable inline or in a
# request file; inline, each is parsed by its form: (items per name after the name, example)
REQUEST_KEYS = {
    "fit": (0, "fit=k1,state:h1"),
    "parameters": (1, "parameters=k2:0.05,k4:0.025"),
    "initial_state": (1, "initial_state=h1:4,h2:3"),
    "bounds": (2, "bounds=k1:0.04:0.06"),
    "priors": (2, "priors=k3:0.05:0.003"),
    "noise": (1, "noise=h2:0.05"),
}


def _inline(key: str, text: str) -> Any:
    """An inline request setting: fit=a,b -> [a, b]; name:value,... -> {name: value};
    name:low:high,... -> {name: [low, high]}; priors name:mean:std -> {name: {"normal": [..]}}."""
    n, example = REQUEST_KEYS[key]
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{key}= is empty; e.g. {example}")
    if n == 0:
        return items
    out: dict[str, Any] = {}
    for item in items:
        parts = item.rsplit(":", n)  # state:<name> keeps its colon
        try:
            if len(parts) != n + 1 or not parts[0]:
                raise ValueError
            nums = [float(x) for x in parts[1:]]
        except ValueError:
            form = (
                "name:value"
                if n == 1
                else ("name:mean:std" if key == "priors" else "name:low:high")
            )
            raise ValueError(
                f"{key}: {item!r} is not {form} (numbers; comma-separated, e.g. {example})"
            ) from None
        if parts[0] in out:
            raise ValueError(f"{key}: {parts[0]!r} is given twice")
        out[parts[0]] = nums[0] if n == 1 else ({"normal": nums} if key == "priors" else nums)
    return out


def parse(argv: list[str]) -> dict:
    cfg = key_values(argv, SETTINGS, __doc__)
    if not cfg["observations"]:
        raise ValueError("observations=... is required")
    if cfg["backend"] not in ("surrogate", "solver"):
        raise ValueError(f"backend must be surrogate or solver, got {cfg['backend']!r}")
    if cfg["backend"] == "surrogate":
        if not cfg["model"]:
            raise ValueError(
                "model=... is required with backend=surrogate (backend=solver system=<name> "
                "calibrates with the physics solver alone)"
            )
        if cfg["system"]:
            raise ValueError(
                "system=... is for backend=solver without a model; a model names its own system"
            )
    elif not cfg["model"] and not cfg["system"]:
        raise ValueError(
            "backend=solver needs system=<name> (a registered system or pkg.module:Class), or "
            "model=... to use a stored model's system, grid and training domain"
        )
    elif cfg["model"] and cfg["system"]:
        raise ValueError("give model=... or system=..., not both: the model names its own system")
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
    if cfg["solver_mode"] not in ("looped", "stacked"):
        raise ValueError(f"solver_mode must be looped or stacked, got {cfg['solver_mode']!r}")
    if cfg["steps"] - cfg["burn"] < 20:
        raise ValueError(
            f"burn must leave at least 20 steps (steps={cfg['steps']}, burn={cfg['burn']})"
        )
    if cfg["mcmc"] not in ("true", "false"):
        raise ValueError(f"mcmc must be true or false, got {cfg['mcmc']!r}")
    cfg["mcmc"] = cfg["mcmc"] == "true"
    if cfg["mcmc"] and cfg["backend"] == "solver":
        raise ValueError("mcmc=true samples on the surrogate: it needs backend=surrogate")
    if cfg["likelihood"] not in NOISE_MODELS:
        raise ValueError(
            f"likelihood must be one of {', '.join(NOISE_MODELS)}, got {cfg['likelihood']!r}"
        )
    raw = cfg["mcmc_seconds"]
    if raw not in (None, ""):
        try:
            cfg["mcmc_seconds"] = float(raw)
        except ValueError:
            cfg["mcmc_seconds"] = float("nan")
        if not 0 < cfg["mcmc_seconds"] < math.inf:
            raise ValueError(f"mcmc_seconds must be a number of seconds > 0, got {raw!r}")
    else:
        cfg["mcmc_seconds"] = None
    cfg["inline"] = {k: _inline(k, cfg[k]) for k in REQUEST_KEYS if cfg[k] is not None}
    if cfg["outputs"] is not None:
        cfg["outputs"] = [s.strip() for s in cfg["outputs"].split(",") if s.strip()]
        if not cfg["outputs"]:
            raise ValueError("outputs= is empty: name the measured outputs, e.g. outputs=h2")
    return cfg


def mcmc_options(cfg: dict) -> dict[str, Any] | None:
    """calibrate()'s `mcmc` from the settings (None: no MCMC); a progress bar on stderr."""
    if not cfg["mcmc"]:
        return None
    return {
        "walkers": cfg["walkers"],
        "steps": cfg["steps"],
        "burn": cfg["burn"],
        "noise_model": cfg["likelihood"],
        "max_seconds": cfg["mcmc_seconds"],
        "progress": True,
    }


def _read_file(path_text: str, setting: str) -> Any:
    """A JSON file, or YAML by its suffix; errors name the setting."""
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"{setting}: no such file {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{setting}: {path} is not valid YAML ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{setting}: {path} is not valid JSON ({e})") from None


def _merge(request: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra`'s keys over `request`'s: fit replaced, the objects merged name by name."""
    out = dict(request)
    for key, value in extra.items():
        old = out.get(key)
        out[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def prepare(cfg: dict):
    """Everything before the first model or solver call: the target (the stored model's card, or
    the system alone), the observations, the request, and its checks. -> (problem, the model's
    card and ONNX path, or None and None, the system or None)."""
    from twin_ml import registry
    from twin_ml.calibrate.problem import (
        Problem,
        SolverTarget,
        observations_from_telemetry,
        read_ingested,
    )

    card = onnx = system = None
    if cfg["model"]:
        onnx, card = registry.onnx_path(cfg["model"])
        target, sys_card = card, card.system
    else:
        from twin_ml.physics.catalog import make_system

        try:
            system = make_system(cfg["system"])
        except KeyError as e:
            raise ValueError(f"system={cfg['system']}: {e.args[0]}") from None
        target = SolverTarget.of(system)
        sys_card = target.system

    obs = Path(cfg["observations"])
    notes: list[str] = []
    if obs.suffix == ".json":
        request = _read_file(cfg["observations"], "observations")
        if not isinstance(request, dict):
            raise ValueError(f"observations: {obs} must hold a JSON object (a calibration request)")
        if cfg["outputs"] is not None:
            given = request.get("outputs") if isinstance(request.get("outputs"), dict) else {}
            absent = [o for o in cfg["outputs"] if o not in given]
            if absent:
                raise ValueError(
                    f"outputs: {absent} are not among the observations' outputs "
                    f"({', '.join(given) or 'none'})"
                )
            left = [o for o in given if o not in cfg["outputs"]]
            if left:
                notes.append(f"observations: outputs not selected (outputs) were ignored: {left}")
            request["outputs"] = {o: given[o] for o in cfg["outputs"]}
    elif obs.is_dir() or obs.suffix == ".parquet":
        if not obs.exists():
            raise ValueError(f"observations: no such file {obs}")
        ingested = read_ingested(obs, "observations")
        request, notes = observations_from_telemetry(
            sys_card,
            ingested.times,
            ingested.signals,
            outputs=cfg["outputs"],
            units=ingested.units,
            roles=ingested.roles,
            where="observations",
            outputs_field="outputs",
        )
        if ingested.system and ingested.system != sys_card.name:
            notes.append(
                f"observations: the telemetry's contract is for system {ingested.system!r}, "
                f"calibrated with {sys_card.name!r} (signals matched by name)"
            )
    else:
        raise ValueError(
            f"observations: {obs} is neither a JSON request (.json) nor twin-ingest's output "
            "(its directory or telemetry.parquet); raw telemetry goes through twin-ingest first"
        )
    if cfg["request"]:
        extra = _read_file(cfg["request"], "request")
        if not isinstance(extra, dict):
            raise ValueError(f"request: {cfg['request']} must hold an object")
        bad = sorted(set(extra) - set(REQUEST_KEYS))
        if bad:
            raise ValueError(
                f"request: unknown keys {bad}; a request file holds {', '.join(REQUEST_KEYS)} "
                "(times, outputs and inputs come from observations=)"
            )
        request = _merge(request, extra)
    request = _merge(request, cfg["inline"])
    problem = Problem.build(request, target, notes)
    return problem, card, onnx, system


def run(cfg: dict) -> Path:
    from twin_ml._io import atomic_write_json
    from twin_ml.calibrate import SolverBackend, SurrogateBackend, calibrate
    from twin_ml.calibrate.report import plot

    problem, card, onnx, system = prepare(cfg)  # every request error is raised here, first
    surrogate = SurrogateBackend(onnx, card) if cfg["backend"] == "surrogate" else None
    solver = SolverBackend(card if card is not None else system, mode=cfg["solver_mode"])
    result = calibrate(
        problem,
        surrogate,
        solver,
        backend=cfg["backend"],
        n_starts=cfg["starts"],
        max_nfev=cfg["max_nfev"],
        mcmc=mcmc_options(cfg),
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
        model=card.ref if card is not None else None,
        system=card.system.name if card is not None else system.name,
        observations=str(cfg["observations"]),
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
