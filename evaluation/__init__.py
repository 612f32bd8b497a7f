"""The evaluation stage: distributed sampling, Inception features, metrics, scheduled evaluation.

Modules, from the pure math outwards:

- ``metrics``         FID, IS, precision/recall, KID as pure functions over features (torch-fidelity's math)
- ``inception``       which Inception weights (torch-fidelity cache/download, a local file, fid-helper's
                      TorchScript export) and the clear error when there are none
- ``features``        uint8 images -> Inception features through torch-fidelity's extractors
- ``pool``            the Ray actor pool every distributed step runs on
- ``seeds``           the seed of each sample index (Ray-free, shared with launch/sample.py)
- ``sampling``        samples addressed by index, one seed each, resumable shards, openai ``.npz``
- ``model_sampling``  ``sample_fn(indices, seeds)`` from a model / a checkpoint's EMA and a sampler
- ``reference``       dataset features and statistics, cached by the manifest's sha256
- ``bpd``             bits/dim: the core's full-chain VLB over held-out shards
- ``report``          metrics.json, the appended table, TensorBoard, the plot
- ``evaluate``        ``evaluate_checkpoint`` and ``watch`` (the entry point is launch/evaluate.py)
"""
