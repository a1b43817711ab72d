"""The import rules of the design: the library's numpy side never pulls in torch, hydra or wandb."""

import subprocess
import sys


def test_physics_and_data_do_not_import_torch_hydra_or_wandb():
    code = (
        "import sys, twin_ml, twin_ml.physics, twin_ml.data\n"
        "twin_ml.physics.make_system('pendulum')\n"
        "bad = [m for m in ('torch', 'lightning', 'hydra', 'wandb') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported: {r.stdout.strip()}"
