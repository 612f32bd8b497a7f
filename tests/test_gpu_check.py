"""benchmarks/gpu_check.py --dry-run: the GPU check's whole code path on CPU, in a subprocess.

The H200 machine it is meant for has torch and nothing else of ours (no ray, deepspeed, pydantic,
webdataset, boto3, PyYAML): the first test blocks those imports in the child process, so a
new import of any of them on the script's path fails here rather than on a lease.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
BLOCKED = ("ray", "deepspeed", "pydantic", "webdataset", "boto3", "yaml", "diffusers")

# The child runs the script as __main__ behind a meta-path finder that refuses the blocked top-level
# packages, then reports which of them ended up in sys.modules anyway.
_CHILD = """
import importlib.abc, json, runpy, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the GPU machine does not have it")
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["gpu_check.py", *{argv!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("LOADED=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_with_only_torch_writes_complete_finite_json(tmp_path: Path):
    out = tmp_path / "gpu.json"
    code = _CHILD.format(blocked=BLOCKED, argv=["--dry-run", "--out", str(out)], script=str(SCRIPT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LOADED=[]" in proc.stdout, proc.stdout[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    assert result["peak_flops"] == 989e12
    assert set(result["presets"]) == {"adm_imagenet64", "ddpm_cifar10"}
    grid = {(p, c, cl) for p in ("fp32", "bf16", "fp16") for c in (False, True) for cl in (False, True)}
    for name, rec in result["presets"].items():
        flops = rec["flops_per_image"]
        # backward costs about twice the forward (two matmuls per forward matmul)
        assert 2.5 < flops["forward_backward"] / flops["forward"] < 3.5, (name, flops)
        seen = set()
        for e in rec["train"]:
            assert e["status"] == "ok", (name, e)
            for key in ("images_per_s", "step_ms", "mfu"):
                assert _finite_positive(e[key]), (name, key, e)
            assert e["mfu"] == pytest.approx(flops["forward_backward"] * e["images_per_s"] / 989e12)
            seen.add((e["precision"], e["compile"], e["channels_last"]))
        assert seen == grid, (name, grid - seen)
        s = rec["sampling"]
        assert s["status"] == "ok" and s["finite"] and _finite_positive(s["images_per_s"]), s
        assert rec["best"]["images_per_s"] == max(e["images_per_s"] for e in rec["train"])
    ds = result["deepspeed"]
    assert ds["status"] == "skipped" and "deepspeed" in ds["reason"], ds
    assert _finite_positive(result["elapsed_s"])


def test_dry_run_deepspeed_section_runs_our_engine_at_world_size_one(tmp_path: Path):
    # deepspeed is a dependency of the project: here it must run (only the GPU machine may lack it)
    out = tmp_path / "ds.json"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--sections", "deepspeed", "--presets", "adm_imagenet64",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ds = json.loads(out.read_text())["deepspeed"]
    assert ds["status"] == "ran"
    assert [r["zero_stage"] for r in ds["runs"]] == [0, 2]
    for r in ds["runs"]:
        assert r["status"] == "ok", r
        assert (r["backend"], r["world_size"]) == ("gloo", 1)
        assert _finite_positive(r["images_per_s"])


def test_bad_budget_exits_2_naming_the_flag(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--budget-s", "-1", "--out",
                           str(tmp_path / "x.json")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--budget-s" in proc.stderr and "positive" in proc.stderr
    assert not (tmp_path / "x.json").exists()
