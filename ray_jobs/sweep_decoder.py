"""Sweep the decoder (the MAE paper's Table 1(a, b)): depth and width, jointly or one at a time.

    python ray_jobs/sweep_decoder.py                           # decoder depth 1, 2, 4, 8
    python ray_jobs/sweep_decoder.py --name decoder-width \
        --set 'sweep.space={model.decoder_embed_dim: [32, 64, 128, 256]}'
    python ray_jobs/sweep_decoder.py --name decoder-joint --set sweep.search=optuna --num-samples 8 \
        --set 'sweep.space={model.decoder_depth: {low: 1, high: 8}, model.decoder_embed_dim: [32, 64, 128]}'

Results: <storage>/<name>/trials.parquet and epochs.parquet. Flags: --help.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `ray_jobs` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.sweep import main

DEFAULT_EXPERIMENT = str(Path(__file__).resolve().parents[1] / "experiments" / "sweep_decoder.yaml")

if __name__ == "__main__":
    sys.exit(main(default_experiment=DEFAULT_EXPERIMENT, description=__doc__))
