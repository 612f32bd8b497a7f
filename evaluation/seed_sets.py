"""One checkpoint evaluated on several seed sets: each evaluation as usual, plus their spread.

``--seeds 0,1,2`` runs :func:`evaluation.evaluate.evaluate_checkpoint` once per evaluation seed
(each into its own folder, since the folder name holds the seed) and writes
``<run>/eval/<checkpoint>/seeds-<s0>-<s1>-...-<name of the first>.json`` with every metric's
values, mean and sample standard deviation over the seed sets.
"""

from __future__ import annotations

import json
from typing import Any

from evaluation.evaluate import EvalResult, evaluate_checkpoint
from evaluation.report import seed_spread
from pipeline.config import ExperimentConfig
from pipeline.data import storage

__all__ = ["evaluate_seed_sets", "parse_seeds"]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); a clear error for anything else."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--seeds: {text!r} is not allowed; give a comma list of integers, e.g. 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {text!r} is not allowed; give at least two distinct integer seeds, e.g. 0,1,2")
    return seeds


def evaluate_seed_sets(cfg: ExperimentConfig, run_url: str, checkpoint: str | int, seeds: tuple[int, ...],
                       **kwargs: Any) -> tuple[list[EvalResult], dict[str, Any], str]:
    """(each seed's result, the summary, where the summary was written)."""
    if cfg.eval.name is not None:
        raise ValueError("--seeds: eval.name must be unset, so that each seed set gets its own folder")
    results = [evaluate_checkpoint(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"seed": seed})}),
                                   run_url, checkpoint, **kwargs) for seed in seeds]
    records = [r.record for r in results]
    summary = {"seeds": list(seeds), "evaluations": [r.url for r in results],
               "checkpoint": records[0]["checkpoint"], "spread": seed_spread(records)}
    folder = results[0].url.rsplit("/", 1)[0]
    url = storage.join(folder, f"seeds-{'-'.join(map(str, seeds))}-{records[0]['name']}.json")
    storage.write_bytes(url, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return results, summary, url
