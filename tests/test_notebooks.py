"""Every notebook runs top to bottom: its code cells, in order, in one namespace, in an empty
working directory, with matplotlib headless (Agg). A notebook fails its test when a command it
runs fails (its helper raises) or when one of the checks it carries fails: the serving notebook's
in/out-of-domain flags, the calibration's solver verification and credible intervals around the
truth, the drift notebook's alarm after (and only after) the injected fault. The notebooks are
split over two files (this one and test_notebooks_export.py) so that `--dist loadfile` can run
them on both workers; a test here checks that every notebook is run by exactly one of them, and
that each is a valid notebook with no stored outputs.

A code cell tagged `teardown` (the serving notebook's "stop the server") also runs when a cell
before it fails, so a failing notebook leaves no server behind. What a notebook changes in this
process is put back afterwards: the environment (BENTOML_HOME), the systems it defined and
registered, its figures."""

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# the notebooks this file runs; test_notebooks_export.py runs the ones that export a model
HERE = ["01_physics_and_data", "02_train_and_evaluate", "05_real_telemetry_and_drift"]


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def run_notebook(path: Path, workdir: Path, monkeypatch) -> None:
    """Execute the notebook's code cells in order in one namespace, in `workdir`, as Jupyter would
    (the module's name is __main__), with the matplotlib backend Agg; `teardown` cells run even if
    a cell before them fails. Then check what every notebook does: each code cell ran, and its
    commands left their summary.json (or `generate_dataset` its manifest.json) in `workdir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twin_ml.physics.registration import SYSTEMS

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    env, systems = dict(os.environ), set(SYSTEMS)
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    ns: dict = {"__name__": "__main__"}
    ran: set[int] = set()

    def run(i: int) -> None:
        ran.add(i)
        source = "".join(cells[i]["source"])
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102

    try:
        for i in range(len(cells)):
            run(i)
        assert ran == set(range(len(cells)))
        records = [*workdir.rglob("summary.json"), *workdir.rglob("manifest.json")]
        assert records, f"{path.name} wrote no summary.json or manifest.json in its directory"
    finally:
        try:
            for i, cell in enumerate(cells):
                if i not in ran and "teardown" in _tags(cell):
                    run(i)
        finally:
            plt.close("all")
            os.environ.clear()
            os.environ.update(env)
            for name in set(SYSTEMS) - systems:  # the notebook's own (the library's may load now)
                if SYSTEMS[name].__module__ == "__main__":
                    del SYSTEMS[name]


@pytest.mark.parametrize("name", HERE)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    run_notebook(NOTEBOOKS_DIR / f"{name}.ipynb", tmp_path, monkeypatch)


def test_every_notebook_is_run_valid_and_stored_without_outputs():
    from test_notebooks_export import HERE as EXPORT

    names = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert len(names) >= 5
    assert sorted(HERE + EXPORT) == names  # each notebook run by exactly one test file
    nbformat = pytest.importorskip("nbformat")
    for name in names:
        nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].cell_type == "markdown", name  # a title and what it teaches
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name
