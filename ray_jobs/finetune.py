"""Fine-tune the best encoders of a sweep end to end (the paper's recipe), as Ray Train jobs.

    python ray_jobs/finetune.py --sweep results/sweep_mask_ratio --top-k 2
    python ray_jobs/finetune.py --sweep results/sweep_mask_ratio --from-scratch   # the baseline
    python ray_jobs/finetune.py --sweep results/sweep_mask_ratio --workers 4 --set sweep.gpus_per_worker=1
    python ray_jobs/finetune.py --checkpoint mae_pretrain_vit_base.pth --experiment experiments/imagenet_vit_base.yaml

Chooses trials as `linear_probe.py` does, then runs `mae.finetune.finetune` (timm ViT with
the encoder's weights, layer-wise lr decay, drop path, label smoothing, mixup/cutmix,
average pooling; `finetune.*` of the experiment sets epochs, batch and lr) in a
TorchTrainer, DDP over --workers. --from-scratch trains the same classifier with the same
schedule from random weights (without layer-wise lr decay), to show what pretraining adds. Each run checkpoints every
`finetune.checkpoint_every` epochs; a failed worker group (up to `sweep.max_failures`
times) resumes from the last checkpoint rather than from epoch 0. Rows go to finetune.parquet
in the sweep folder (init: pretrained or scratch); the fine-tuned classifier is saved in
each row's checkpoint_path. Exit status: 0 all finished, 1 some failed, 2 bad arguments,
130 interrupted (--resume RUN_ID continues).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `ray_jobs` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_jobs.reuse import FINETUNE, build_parser, main

if __name__ == "__main__":
    parser = build_parser(FINETUNE, __doc__)
    parser.add_argument("--from-scratch", action="store_true",
                        help="random initial weights instead of the trials' encoders (same schedule, no layer decay)")
    parser.add_argument("--workers", type=int, default=1, help="Train workers (DDP) per encoder (default 1)")
    args = parser.parse_args()
    sys.exit(main(FINETUNE, None, __doc__, workers=args.workers, from_scratch=args.from_scratch, args=args))
