import numpy as np
import torsion_rig  # noqa: F401  (registers "torsion_rotor")

from twin_ml import Dataset, ScenarioDesign, generate_dataset, make_system, solve_looped

rotor = make_system("torsion_rotor")  # or make_system("torsion_rig:TorsionRig") without the import
design = ScenarioDesign(t_end=2.0, dt=0.1, regime="stiff")
data = generate_dataset(rotor, design, n_scenarios=16, seed=0, out_dir="data/torsion")
test = Dataset.open(data.path).load("test")  # t [T], x0 [N, nx], u [N, T, nu], y, p

no_drag = make_system("torsion_rotor", drag=False)  # the physics term a hybrid would start from
res = solve_looped(no_drag, test["t"], test["u"], test["p"], test["x0"])
print("what the drag term is worth:", np.abs(res.y - test["y"]).max(), "rad")
