"""Sweep the mask ratio (the MAE paper's Fig. 5): pretrain one model per ratio, quick-probe each.

    python ray_jobs/sweep_mask_ratio.py                       # laptop default, embedded Ray
    python ray_jobs/sweep_mask_ratio.py --set train.epochs=20 --name longer
    ray job submit --working-dir . -- python ray_jobs/sweep_mask_ratio.py --storage /shared/results

Results: <storage>/<name>/trials.parquet and epochs.parquet. Flags: --help.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `ray_jobs` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.sweep import main

DEFAULT_EXPERIMENT = str(Path(__file__).resolve().parents[1] / "experiments" / "sweep_mask_ratio.yaml")

if __name__ == "__main__":
    sys.exit(main(default_experiment=DEFAULT_EXPERIMENT, description=__doc__))
