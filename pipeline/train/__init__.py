"""Training: DeepSpeed ZeRO engines under Ray Train, EMA, sharded checkpoints, exact resume.

The only package that imports deepspeed (lazily, inside :mod:`pipeline.train.engine`).

Entry points:
    ``ray_launch.run_training(cfg, address=None)``  TorchTrainer with N workers (``launch/train.py``)
    ``loop.train(cfg)``                             the per-worker loop (also runs as one process)
Reading a run without DeepSpeed or Ray:
    ``checkpoint.load_ema_weights(run_dir, checkpoint="latest" | images_seen, rate=None)``
        -> (state_dict with keys ``net.*`` (the network) and ``objective.*`` (e.g. VDM's schedule),
            manifest)
    ``checkpoint.committed_checkpoints(run_dir)`` / ``resolve_checkpoint(run_dir, which)``

Modules: ``dist`` (every rank-dependent helper; a single process is a world of one), ``engine``
(DeepSpeed config + client AdamW + LR warm-up), ``ema`` (partitioned fp32 EMA), ``checkpoint``
(manifest, checksums, retention), ``objective`` (network + loss as the engine's module), ``data``
(the per-rank reader), ``metrics`` (TensorBoard, metrics.jsonl, progress bar, PNG grids),
``rundir`` (local or s3:// run directory), ``loop``, ``ray_launch``.
"""
