"""Training runs, what twin-train calls: fit an ensemble with Lightning on a scenario dataset
(`dataset`) or on measured telemetry records (`telemetry`), then calibrate and evaluate it.

Plain Python with typed arguments: the entry point (training/train.py) builds the system, model,
trainer, callbacks and loggers from the config and writes the run directory. Importing this
package imports nothing; its modules import torch and Lightning.
"""
