"""Ray drivers over the `mae` library: distributed pretraining (Ray Train) and sweeps (Ray Tune).

This package is the only place Ray is imported. `space` (search spaces), `results`
(the Parquet tables) and `scratch` (workers' scratch folders) are plain Python, so they can be
checked and read without Ray.
Scripts: `pretrain.py` (one TorchTrainer run), `sweep_mask_ratio.py` and
`sweep_decoder.py` (presets over the shared driver in `sweep.py`).
"""
