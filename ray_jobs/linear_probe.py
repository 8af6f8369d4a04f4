"""Linear-probe the best encoders of a sweep (the paper's recipe), as Ray Train jobs.

    python ray_jobs/linear_probe.py --sweep results/sweep_mask_ratio --top-k 3
    python ray_jobs/linear_probe.py --sweep results/sweep_mask_ratio --metric final_train_loss \
        --experiment experiments/reuse_fashion_mnist.yaml --set probe.epochs=20
    python ray_jobs/linear_probe.py --checkpoint mae_pretrain_vit_base.pth --experiment experiments/imagenet_vit_base.yaml
    ray job submit --working-dir . -- python ray_jobs/linear_probe.py --sweep /shared/results/sweep_mask_ratio

Chooses the best K finished trials of trials.parquet by --metric (default: the sweep's
objective), loads each encoder from its checkpoint and runs `mae.probe.linear_probe`
(frozen encoder, BatchNorm without affine, linear head, LARS or SGD, cosine schedule with
warm-up; `probe.*` of the experiment sets epochs, batch and lr) in a one-worker
TorchTrainer. Rows go to probe.parquet in the sweep folder, one per (trial, run), keyed by
trial_id; each row's checkpoint_path is the trained head (BatchNorm statistics + linear),
`mae.probe.load_probe_head(path)`. Each run checkpoints every `probe.checkpoint_every`
epochs; a failed worker (up to `sweep.max_failures` times) resumes from the last checkpoint
rather than from epoch 0. Exit status: 0 all probed, 1 some failed (see the error column),
2 bad arguments, 130 interrupted (--resume RUN_ID continues).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `ray_jobs` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.reuse import PROBE, main

if __name__ == "__main__":
    # mae.probe.linear_probe is single-process: one worker per encoder.
    sys.exit(main(PROBE, sys.argv[1:], __doc__, workers=1))
