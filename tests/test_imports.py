"""The import rules of the design: the library's numpy side (and the registry the server uses) never
pulls in torch, hydra or wandb."""

import subprocess
import sys

CODE = """
import sys, tempfile, twin_ml, twin_ml.physics, twin_ml.data, twin_ml.registry
from twin_ml.data import Dataset, ScenarioDesign, generate_dataset
from twin_ml.data.plots import plot_dataset
res = generate_dataset(twin_ml.physics.make_system('pendulum'), ScenarioDesign(t_end=1.0), n_scenarios=4, seed=0,
                       out_dir=tempfile.mkdtemp(), workers=2, shard_size=2, progress=False)
plot_dataset(Dataset.open(res.path), res.path / 'overview.png')
bad = [m for m in ('torch', 'lightning', 'hydra', 'wandb', 'training', 'serving') if m in sys.modules]
print(','.join(bad))
"""


def test_physics_and_data_do_not_import_torch_hydra_wandb_or_upper_layers():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported: {r.stdout.strip()}"
