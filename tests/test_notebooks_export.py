"""The notebooks that export a model (export and serve, calibrate), run top to bottom as
test_notebooks.py runs the others: a file of their own, so that `--dist loadfile` can run them on
the other worker."""

import pytest
from test_notebooks import NOTEBOOKS_DIR, run_notebook

HERE = ["03_export_and_serve", "04_calibrate"]


@pytest.mark.parametrize("name", HERE)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    run_notebook(NOTEBOOKS_DIR / f"{name}.ipynb", tmp_path, monkeypatch)
