"""Suite-wide settings: CPU DeepSpeed, no Ray usage stats, a persistent torch-extensions cache."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

pytest_plugins = ["s3server"]  # SeaweedFS fixtures: s3_server, s3_env, s3_bucket

# The suite's tensors are small: on 2 shared cores one intra-op thread per process is several
# times faster than oversubscribed thread pools (Ray/DeepSpeed workers are separate processes).
import torch  # noqa: E402

torch.set_num_threads(1)
