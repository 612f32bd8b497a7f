"""Convert a released openai checkpoint to a native export folder (model.safetensors + config.json + card).

    python launch/convert.py --from guided-diffusion|improved-diffusion|guided-diffusion-classifier \\
                             --checkpoint FILE.pt --flags "<MODEL_FLAGS of the source's README>" --out DIR
                             [--overwrite]

``--flags`` takes the README's flag string as is (the diffusion flags, e.g. ``--noise_schedule``,
``--diffusion_steps``, ``--learn_sigma``, included; sampling and training flags are accepted and
ignored). The checkpoint is read with ``torch.load(weights_only=True)``. The folder loads like any
export: ``launch/sample.py --model DIR``, ``pipeline.loading.load_model(DIR)``,
``train.init_from=DIR``. Bad input (unknown flags, a state dict that does not fit them, a file
that is not a plain state dict) exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipeline.convert import SOURCES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the codebase that wrote the file")
    p.add_argument("--checkpoint", required=True, help="the released .pt state dict")
    p.add_argument("--flags", required=True, help="the MODEL_FLAGS (+ DIFFUSION_FLAGS) string of the source's README")
    p.add_argument("--out", required=True, help="export folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from pipeline.convert import convert_checkpoint

    command = shlex.join(["python", "launch/convert.py", *argv])
    try:
        result = convert_checkpoint(args.source, args.checkpoint, args.flags, args.out, overwrite=args.overwrite,
                                    command=command)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {args.checkpoint} ({result.source}, {result.num_parameters:,} parameters) to {result.path}:")
    for name in result.files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
