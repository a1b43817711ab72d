"""twin-generate as a user runs it: a real subprocess, Hydra overrides, one-line errors; and --help
on every command."""

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
    # the command's contract, not the horizon: 200 s of the tanks' 1024 (50 of their 256 steps)
    settings = ["system=cascaded_tanks", "n_scenarios=12", "seed=3", "design.t_end=200"]
    r = run(*settings, f"out_dir={out}", "shard_size=4")
    assert r.returncode == 0, r.stderr
    summary = Path(r.stdout.strip().splitlines()[-1])
    assert summary == out / "summary.json"
    s = json.loads(summary.read_text())
    m = json.loads((out / "manifest.json").read_text())
    assert (
        s["dataset_sha256"] == m["dataset_sha256"]
        and s["counts"]["total"]
        == 24  # 12 in-domain, ceil(0.1 x 12) outside, ceil(0.8 x 12) calibration
        and s["counts"]["calibration"] == 10
        and s["n_failures"] == 0
    )
    assert m["system"]["name"] == "cascaded_tanks" and (out / "config.yaml").exists()
    r2 = run(*settings, f"out_dir={tmp_path / 'again'}", "shard_size=4", "workers=2")
    assert (
        json.loads((tmp_path / "again" / "manifest.json").read_text())["dataset_sha256"]
        == m["dataset_sha256"]
    )
    assert r2.returncode == 0


def test_killed_run_resumes_to_the_same_dataset(tmp_path):
    # resumption, not calibration: the shards of the in-domain and extrapolation scenarios do
    args = ["system=duffing", "n_scenarios=12", "seed=1", "shard_size=2", "progress=false"]
    args += ["design.calibration_fraction=0", "design.t_end=0.16384"]  # 100 samples
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
            "unknown system 'pendulm'; known systems: cascaded_tanks, cstr, duffing, heat_plate, "
            "pendulum",
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
        ScenarioDesign(calibration_fraction=0.8),  # configs/design/lhs.yaml's (the API's is 0)
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


def test_every_shipped_system_has_a_config_that_composes():
    from hydra import compose, initialize_config_dir

    # the FMU example's config composes here; its system needs the built .fmu (test_fmu.py
    # builds it and instantiates this config)
    fmus = ["damped_oscillator_fmu"]
    configs = sorted(p.stem for p in (ROOT / "configs" / "system").glob("*.yaml"))
    assert configs == sorted(SHIPPED + fmus)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name in SHIPPED + fmus:
            cfg = compose(config_name="generate", overrides=[f"system={name}"])
            from hydra.utils import instantiate

            if name in fmus:
                assert cfg.system._target_ == "twin_ml.physics.fmu.FMUSystem"
            else:
                assert instantiate(cfg.system).name == name


# ---- --help on every command ---------------------------------------------------------------------

HYDRA_APPS = {"twin-generate": "generate", "twin-train": "train", "twin-evaluate": "evaluate"}
HYDRA_APPS["twin-export"] = "export"
KEY_VALUE = {
    "twin-serve": "training.serve",
    "twin-calibrate": "training.calibrate",
    "twin-ingest": "training.ingest",
    "twin-monitor": "training.monitor",
    "twin-stream": "training.stream",
    "twin-replay": "training.replay",
}


def test_every_console_script_has_help():
    """pyproject's console scripts are the commands these tests ask for --help."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {*HYDRA_APPS, *KEY_VALUE, "twin-models"}


def _help(command: str, flag: str = "--help") -> list[str]:
    r = subprocess.run(
        [str(Path(sys.executable).parent / command), flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr
    return r.stdout.splitlines()


def _setting_line(lines: list[str], name: str) -> str:
    found = [ln for ln in lines if ln.split()[:1] == [name] and ln.startswith("  ")]
    assert len(found) == 1, f"{name!r}: no line of its own in the help"
    return found[0]


@pytest.mark.parametrize("command", sorted(KEY_VALUE))
def test_key_value_command_help_lists_every_setting_with_its_default(command):
    """--help (and -h) exits 0 and gives each setting a line: name, default, and (for the
    commands whose settings declare it) its meaning."""
    import importlib

    from training._common import Setting

    module = importlib.import_module(KEY_VALUE[command])
    settings = getattr(module, "SETTINGS", None) or module.DEFAULTS
    lines = _help(command, "-h" if command == "twin-serve" else "--help")
    assert lines[0].startswith(f"{command}: ")  # the description first, then the table
    lines = lines[lines.index("settings (key=value; default, meaning):") :]
    for name, setting in settings.items():
        line = _setting_line(lines, name)
        if isinstance(setting, Setting):
            default = "(required)" if setting.required else setting.default or "-"
            assert line.split()[1] == default and line.endswith(setting.help)
        else:
            assert line.split()[1] == (setting or "-")


@pytest.mark.parametrize("command", sorted(HYDRA_APPS))
def test_hydra_app_help_says_what_it_does_and_lists_its_settings(command):
    """--help exits 0 with the command's own text: every top-level setting of its config on a
    line with its default, and every config group with the option chosen."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from training._common import shown

    name = HYDRA_APPS[command]
    lines = _help(command)
    assert lines[0].startswith(f"{command}: ") and "is powered by Hydra" not in "\n".join(lines)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    groups = [g for g in choices if not g.startswith("hydra")]
    for key in cfg:
        if key == "hydra" or key in groups:
            continue
        line = _setting_line(lines, key)
        if OmegaConf.is_missing(cfg, key):
            assert "(required)" in line
            continue
        try:
            value = shown(OmegaConf.select(cfg, key, throw_on_missing=True))
        except Exception:  # interpolates a required value (out_dir=${run_dir}/...)
            continue
        assert line.endswith(f"[{value}]"), (line, value)
    for group in groups:
        assert _setting_line(lines, group).endswith(f"[{shown(choices[group])}]")


def test_twin_models_help_lists_its_commands():
    lines = _help("twin-models", "-h")
    text = "\n".join(lines)
    for cmd, meaning in (
        ("list", "stored twin-ml models"),
        ("show", "the verified model card"),
        ("verify", "recompute every file's sha256"),
        ("promote", "point NAME:<stage> at a version"),
    ):
        assert f"{cmd} " in text and meaning in text


# ---- the user's own config directory beside the clone ------------------------------------------


def _user_dir(root: Path) -> Path:
    """A user's config directory outside the repository: a system (the mass-spring module on
    PYTHONPATH), an experiment that selects it, and a contract."""
    d = root / "my_twin"
    for sub in ("system", "experiment", "contract"):
        (d / sub).mkdir(parents=True)
    (d / "system" / "my_spring.yaml").write_text(
        "_target_: twin_ml.physics.make_system\nname: mass_spring:MassSpring\n"
    )
    (d / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /system: my_spring\n"
        "n_scenarios: 3\nshard_size: 8\nprogress: false\ndesign:\n  t_end: 1.0\n"
    )
    (d / "contract" / "my_spring.yaml").write_text(
        "system: mass_spring\nperiod_s: 0.05\nsignals:\n"
        "  - {name: force, role: input, unit: N}\n  - {name: pos, role: output, unit: m}\n"
    )
    return d


def test_experiment_and_system_from_a_user_config_dir(tmp_path):
    """--config-dir DIR (and hydra.searchpath=[file://DIR]) adds the user's experiment/ and system/
    to the project's: experiment=my_exp selects DIR/experiment/my_exp.yaml, which selects
    DIR/system/my_spring.yaml. An unknown name is one line that lists the names of every config
    directory and where it looked; a missing --config-dir is one line too."""
    user = _user_dir(tmp_path)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    for how, out in (
        (["--config-dir", str(user)], "a"),
        ([f"hydra.searchpath=[file://{user}]"], "b"),
        (["--config-dir=../my_twin"], "c"),  # relative to the directory the command starts in
    ):
        r = run(*how, "experiment=my_exp", f"out_dir={tmp_path / out}", cwd=elsewhere)
        assert r.returncode == 0, r.stderr
        m = json.loads((tmp_path / out / "manifest.json").read_text())
        # 3 in-domain, 1 outside the box, ceil(0.8 x 3) calibration
        assert m["system"]["name"] == "mass_spring" and m["counts"]["total"] == 7, how
    r = run("--config-dir", str(user), "experiment=my_exq", f"out_dir={tmp_path / 'x'}")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: experiment='my_exq' is unknown; known experiment configs: ")
    assert "my_exp" in lines[0] and "pendulum_node" in lines[0]
    assert f"searched {user / 'experiment'}, {ROOT / 'configs' / 'experiment'}" in lines[0]
    r = run("--config-dir", str(tmp_path / "nope"), "experiment=my_exp")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --config-dir '{tmp_path / 'nope'}': no such directory {tmp_path / 'nope'}"
    )
    assert not (tmp_path / "x").exists()


def test_one_rule_finds_config_files_by_name_or_path(tmp_path, monkeypatch):
    """config_file: a name is looked up in each config directory of the search path (the user's
    first, then the project's); a .yaml value or an existing file is a path, as given (relative to
    the directory the command started in); errors name the setting and list the names found.
    twin-ingest's contract= follows the same rule (its only config directory: the project's)."""
    from training._common import config_dirs, config_file
    from training.ingest import contract_path

    user = _user_dir(tmp_path)
    project = ROOT / "configs"
    assert config_dirs([]) == [project]
    dirs = config_dirs(["--config-dir", str(user), "experiment=x"])
    assert dirs == [user, project]
    assert config_dirs(["-cd", str(user), f"hydra.searchpath=[file://{tmp_path}]"]) == [
        user,
        tmp_path,
        project,
    ]
    # a name in the project, a name in the user's directory, the user's first where both have it
    assert config_file("contract", "cascaded_tanks", dirs=dirs) == (
        project / "contract" / "cascaded_tanks.yaml"
    )
    assert config_file("contract", "my_spring", dirs=dirs) == user / "contract" / "my_spring.yaml"
    (user / "contract" / "silverbox.yaml").write_text("system: silverbox\n")
    assert config_file("contract", "silverbox", dirs=dirs) == user / "contract" / "silverbox.yaml"
    # a path relative to the current directory, as given (no configs/contract/ prefix or suffix)
    monkeypatch.chdir(tmp_path)
    rel = "my_twin/contract/my_spring.yaml"
    assert config_file("contract", rel, dirs=dirs) == tmp_path / rel
    assert contract_path(rel) == tmp_path / rel
    assert config_file("contract", str(tmp_path / rel), dirs=[project]) == tmp_path / rel
    # errors: the setting, the names found, where
    with pytest.raises(ValueError) as e:
        config_file("contract", "my_sprung", setting="telemetry.contract", dirs=dirs)
    assert str(e.value) == (
        "telemetry.contract='my_sprung' is unknown; known contracts: cascaded_tanks, my_spring, "
        f"silverbox (searched {user / 'contract'}, {project / 'contract'}; or give a path to a "
        ".yaml file)"
    )
    with pytest.raises(ValueError, match=r"telemetry.contract='contracts/x.yaml': no such file"):
        config_file("contract", "contracts/x.yaml", setting="telemetry.contract", dirs=dirs)
    with pytest.raises(ValueError, match="contract='my_spring' is unknown; known contracts: "):
        contract_path("my_spring")  # twin-ingest knows the project's configs/ only
