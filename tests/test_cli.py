"""twin-generate as a user runs it: a real subprocess, Hydra overrides, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ASSETS, SHIPPED

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "twin-generate"


def run(*args, env=None, **kw):
    e = {**os.environ, "PYTHONPATH": str(ASSETS), **(env or {})}
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, env=e, timeout=300, **kw
    )


def test_contract_command_writes_a_hashed_dataset_and_prints_the_summary_last(tmp_path):
    out = tmp_path / "ds"
    r = run("system=cascaded_tanks", "n_scenarios=12", "seed=3", f"out_dir={out}", "shard_size=4")
    assert r.returncode == 0, r.stderr
    summary = Path(r.stdout.strip().splitlines()[-1])
    assert summary == out / "summary.json"
    s = json.loads(summary.read_text())
    m = json.loads((out / "manifest.json").read_text())
    assert (
        s["dataset_sha256"] == m["dataset_sha256"]
        and s["counts"]["total"] == 14
        and s["n_failures"] == 0
    )
    assert m["system"]["name"] == "cascaded_tanks" and (out / "config.yaml").exists()
    r2 = run(
        "system=cascaded_tanks",
        "n_scenarios=12",
        "seed=3",
        f"out_dir={tmp_path / 'again'}",
        "shard_size=4",
        "workers=2",
    )
    assert (
        json.loads((tmp_path / "again" / "manifest.json").read_text())["dataset_sha256"]
        == m["dataset_sha256"]
    )
    assert r2.returncode == 0


def test_killed_run_resumes_to_the_same_dataset(tmp_path):
    args = ["system=duffing", "n_scenarios=12", "seed=1", "shard_size=2", "progress=false"]
    ref = run(*args, f"out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    e = {**os.environ, "PYTHONPATH": str(ASSETS)}
    proc = subprocess.Popen(
        [str(BIN), *args, f"out_dir={out}"],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.npz"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    done_before = len(list((out / "shards").glob("*.npz")))
    n_shards = len(json.loads((tmp_path / "ref" / "manifest.json").read_text())["shards"])
    assert 2 <= done_before < n_shards and not (out / "manifest.json").exists()
    r = run(*args, f"out_dir={out}")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_reused"] >= 2 and s["shards_reused"] + s["shards_written"] == n_shards
    ref_sha = json.loads((tmp_path / "ref" / "manifest.json").read_text())["dataset_sha256"]
    assert s["dataset_sha256"] == ref_sha


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["system.name=pendulm"],
            "unknown system 'pendulm'; known systems: cascaded_tanks, cstr, duffing, pendulum",
        ),
        (
            ["+design.parameters.length=[2.0,1.0]"],
            "design.parameters.length: low (2.0) > high (1.0)",
        ),
        (["n_scenarios=0"], "n_scenarios must be an integer > 0, got 0"),
        (["n_scenarios=-5"], "n_scenarios must be an integer > 0, got -5"),
        (["solver.method=Euler"], "solver.method must be one of"),
        (
            ["+system.lenght=2"],
            "system 'pendulum': unknown options ['lenght']; its options are ['damped']",
        ),
        (["system.damped=maybe"], "system option 'damped' must be true or false"),
        (["n_scenarios=true"], "n_scenarios must be an integer > 0, got True"),
        (
            ["+design.signals.torque={f_min: 2.0, f_max: 1.0}"],
            "design.signals.torque: signal multisine: f_min (2.0) > f_max (1.0)",
        ),
        (["+design.signals.torque={f_max: 50.0}"], "below the grid's Nyquist frequency 10"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "ds"
    r = run(*args, f"out_dir={out}")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in r.stderr
    assert not out.exists()


def test_unknown_system_config_is_one_line_that_lists_the_options(tmp_path):
    r = run("system=pendulm", f"out_dir={tmp_path / 'x'}")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert (
        r.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("error: system='pendulm' is unknown")
    )
    assert all(name in lines[0] for name in SHIPPED)
    assert not (tmp_path / "x").exists()


def test_unwritable_and_existing_out_dirs(tmp_path):
    (tmp_path / "plainfile").write_text("")  # a path that cannot become a directory, even for root
    r = run(f"out_dir={tmp_path / 'plainfile' / 'ds'}", "n_scenarios=2")
    assert (
        r.returncode == 2
        and f"out_dir '{tmp_path / 'plainfile' / 'ds'}' cannot be created" in r.stderr
    )
    ok = run(f"out_dir={tmp_path / 'ds'}", "n_scenarios=2", "+design.t_end=1.0")
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    r = run(f"out_dir={tmp_path / 'ds'}", "n_scenarios=3", "+design.t_end=1.0")
    assert r.returncode == 2 and "different settings; pass overwrite=true" in r.stderr
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before  # untouched
    assert (
        run(
            f"out_dir={tmp_path / 'ds'}", "n_scenarios=3", "+design.t_end=1.0", "overwrite=true"
        ).returncode
        == 0
    )


def test_user_system_by_import_path(tmp_path):
    r = run(
        "system.name=mass_spring:MassSpring",
        "~system.damped",
        "n_scenarios=4",
        f"out_dir={tmp_path / 'a'}",
        "design.regime=stiff_spring",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (
        m["system"]["name"] == "mass_spring" and m["system"]["inputs"][0]["interpolation"] == "zoh"
    )
    assert all(6.0 <= v <= 8.0 for v in m["design"]["box"]["parameter:k"])
    r = run("system.name=mass_spring:MassSpring", "n_scenarios=4", f"out_dir={tmp_path / 'b'}")
    assert r.returncode == 2 and "unknown options ['damped']; its options are none" in r.stderr


def test_api_and_cli_with_the_same_settings_make_the_same_dataset(tmp_path):
    from twin_ml.data import ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    api = generate_dataset(
        make_system("cascaded_tanks"),
        ScenarioDesign(),
        n_scenarios=6,
        seed=2,
        out_dir=tmp_path / "api",
        progress=False,
    )
    r = run(
        "system=cascaded_tanks",
        "system.h1_max=10",
        "n_scenarios=6",
        "seed=2",
        f"out_dir={tmp_path / 'api'}",
    )
    assert r.returncode == 0, (
        r.stderr
    )  # found complete: the int 10 and the default 10.0 are one setting
    assert (
        json.loads((tmp_path / "api" / "summary.json").read_text())["dataset_sha256"]
        == api.manifest["dataset_sha256"]
    )


def test_readme_example_is_the_tested_user_system():
    readme = (ROOT / "README.md").read_text()
    example = (ASSETS / "mass_spring.py").read_text()
    assert example in readme, (
        "README's custom-system example drifted from tests/assets/mass_spring.py"
    )
    body = [
        ln for ln in example.splitlines() if ln.strip() and not ln.strip().startswith(("#", '"""'))
    ]
    assert len(body) < 40


def test_every_shipped_system_has_a_config_that_composes():
    from hydra import compose, initialize_config_dir

    assert sorted(p.stem for p in (ROOT / "configs" / "system").glob("*.yaml")) == sorted(SHIPPED)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name in SHIPPED:
            cfg = compose(config_name="generate", overrides=[f"system={name}"])
            from hydra.utils import instantiate

            assert instantiate(cfg.system).name == name
