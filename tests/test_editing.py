"""Editing on the CLI (``launch/sample.py --inpaint / --invert / --interpolate``, evaluation/editing.py).

Exports of the tiny run layout of tests/test_export.py (a real randomized class-conditional network;
a DDPM export and a VP-SDE export). Inpainting keeps the known pixels exactly (compared with the
input PNG after quantisation) and image i depends on its seed ``sample_seed(seed, i)`` only; DDIM
inversion round-trips within the tolerance measured here (max |x - decode(invert(x))| in [-1, 1]
units, an 8x8 RGB random image: 0.060 at 10 steps, 0.019 at 50, 0.0093 at 100, i.e. O(1/steps)
as DDIM's discretisation predicts; the test bounds 100 steps by 0.02 and requires it below the
10-step error. On the trained 16x16 quickstart export the round trip of one of its own samples
measured max 0.81 / 0.40 / 0.185 at 20 / 50 / 100 steps, mean 0.0077 at 100: again O(1/steps));
slerp frames at the ends equal the DDIM decodes of the two x_T.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_export import TINY_MODEL, make_run  # noqa: E402

from evaluation import editing  # noqa: E402
from evaluation.model_sampling import to_uint8  # noqa: E402
from evaluation.seeds import sample_seeds  # noqa: E402
from launch import sample as sample_cli  # noqa: E402
from pipeline.export import export_run  # noqa: E402

SIZE, PAD = 8, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ddpm_export(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("edit_ddpm")
    export_run(str(make_run(base / "run", TINY_MODEL)), str(base / "export"))
    return base / "export"


@pytest.fixture(scope="module")
def sde_export(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("edit_sde")
    export_run(str(make_run(base / "run", TINY_MODEL, diffusion={"objective": "vp_sde"})), str(base / "export"))
    return base / "export"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A random 8x8 RGB image, a left-half-known mask (gray PNG) and a wrong-size mask and image."""
    base = tmp_path_factory.mktemp("edit_inputs")
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(base / "image.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    mask[0, -1] = 255  # one known pixel inside the hole
    Image.fromarray(mask).save(base / "mask.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(base / "small_mask.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(base / "large.png")
    return {p.stem: p for p in base.iterdir()}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = sample_cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _cells(path: Path, n: int) -> np.ndarray:
    """The n cells of a row written by an edit, (n, H, W, C) uint8."""
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (SIZE + 2 * PAD, n * (SIZE + PAD) + PAD, 3)
    return np.stack([sheet[PAD:PAD + SIZE, PAD + i * (SIZE + PAD):PAD + i * (SIZE + PAD) + SIZE] for i in range(n)])


def _known(inputs) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(Image.open(inputs["image"])), np.asarray(Image.open(inputs["mask"])) >= 128


def test_inpaint_repaint_keeps_known_pixels_and_each_image_follows_its_seed(ddpm_export, inputs, tmp_path, capsys):
    out = tmp_path / "inpaint.png"
    rc, text = _cli(["--model", str(ddpm_export), "--inpaint", str(inputs["image"]), "--mask", str(inputs["mask"]),
                     "--num", "3", "--steps", "8", "--resample", "2", "--seed", "4", "--out", str(out)], capsys)
    assert rc == 0, text
    cells = _cells(out, 3)
    image, known = _known(inputs)
    for cell in cells:
        assert np.array_equal(cell[known], image[known])  # exactly, after quantisation
        assert not np.array_equal(cell[~known], image[~known])
    assert not np.array_equal(cells[0][~known], cells[1][~known])  # different seeds, different fills
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sampler"] == "ddpm" and record["options"]["resample"] == 2  # RePaint's ancestral steps
    assert record["seeds"] == [int(s) for s in sample_seeds(4, np.arange(3))]
    # image 2 alone, from its own seed, through the library: the same completion as in the batch
    model = editing.load_edit_model(str(ddpm_export))
    shape = model.shape
    x = editing.inpaint(model, editing.read_image(str(inputs["image"]), shape),
                        editing.read_mask(str(inputs["mask"]), shape), sample_seeds(4, [2]), sampler="ddpm",
                        steps=8, options={"resample": 2})
    assert np.array_equal(to_uint8(x)[0], cells[2])


def test_inpaint_with_the_pc_sampler_for_a_score_sde(sde_export, inputs, tmp_path, capsys):
    out = tmp_path / "pc.png"
    rc, text = _cli(["--model", str(sde_export), "--inpaint", str(inputs["image"]), "--mask", str(inputs["mask"]),
                     "--num", "2", "--steps", "6", "--out", str(out)], capsys)
    assert rc == 0, text
    assert json.loads(out.with_suffix(".json").read_text())["sampler"] == "pc"
    image, known = _known(inputs)
    for cell in _cells(out, 2):
        assert np.array_equal(cell[known], image[known])
        assert not np.array_equal(cell[~known], image[~known])
    rc, text = _cli(["--model", str(sde_export), "--inpaint", str(inputs["image"]), "--mask", str(inputs["mask"]),
                     "--num", "1", "--resample", "2", "--out", str(tmp_path / "r.png")], capsys)
    assert rc == 2 and "--resample: not allowed with sampler 'pc'" in text


def test_invert_round_trips_within_the_measured_tolerance(ddpm_export, inputs, tmp_path, capsys):
    errors = {}
    for steps in (10, 100):
        out = tmp_path / f"invert{steps}.png"
        rc, text = _cli(["--model", str(ddpm_export), "--invert", str(inputs["image"]), "--steps", str(steps),
                         "--out", str(out)], capsys)
        assert rc == 0, text
        record = json.loads(out.with_suffix(".json").read_text())
        errors[steps] = record["round_trip_max_abs_error"]
        assert f"max abs error {errors[steps]:.3g}" in text
    assert errors[100] < 0.02 and errors[100] < errors[10]  # O(1/steps); measured 0.0093 and 0.060
    source, back = _cells(tmp_path / "invert100.png", 2)
    assert np.array_equal(source, np.asarray(Image.open(inputs["image"])))
    assert np.abs(source.astype(int) - back).max() <= 3  # 0.02 in [-1, 1] is 2.55 levels
    x_T = np.load(tmp_path / "invert100.npy")
    assert x_T.shape == (3, SIZE, SIZE) and x_T.dtype == np.float32
    image = np.asarray(Image.open(inputs["image"])).transpose(2, 0, 1) / 127.5 - 1
    assert np.abs(x_T - image).max() > 0.5  # the latent at abar_T ~ 0, not the image
    # decoding the saved x_T through the library gives the written reconstruction
    model = editing.load_edit_model(str(ddpm_export))
    again = editing.decode(model, torch.as_tensor(x_T)[None], sample_seeds(0, [0]), steps=100)
    assert np.array_equal(to_uint8(again)[0], back)


def test_interpolate_writes_k_frames_whose_ends_decode_the_two_latents(ddpm_export, tmp_path, capsys):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, rng.standard_normal((3, SIZE, SIZE)).astype(np.float32))
    np.save(b, rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32))
    out = tmp_path / "interp.png"
    rc, text = _cli(["--model", str(ddpm_export), "--interpolate", str(a), str(b), "--frames", "5", "--steps", "6",
                     "--seed", "2", "--out", str(out)], capsys)
    assert rc == 0, text
    frames = _cells(out, 5)
    model = editing.load_edit_model(str(ddpm_export))
    label_seed = sample_seeds(2, [0])  # every frame takes frame 0's label
    for path, frame in ((a, frames[0]), (b, frames[-1])):
        z = editing.read_latent(str(path), model.shape)
        end = to_uint8(editing.decode(model, z, label_seed, steps=6, clip_denoised=True))[0]
        assert np.abs(end.astype(int) - frame).max() <= 1  # slerp's ends are z0, z1 to float rounding
    assert len({frame.tobytes() for frame in frames}) == 5
    labels = json.loads(out.with_suffix(".json").read_text())["labels"]
    assert len(labels) == 5 and len(set(labels)) == 1


def test_bad_edits_exit_2_with_a_message(ddpm_export, sde_export, inputs, tmp_path, capsys):
    model, out = str(ddpm_export), str(tmp_path / "x.png")
    inpaint = ["--inpaint", str(inputs["image"]), "--mask", str(inputs["mask"]), "--num", "1"]
    cases = [
        (["--inpaint", str(inputs["image"]), "--mask", str(inputs["small_mask"]), "--num", "1"],
         "--mask: ", "it must be the image's size, 8x8"),
        (["--inpaint", str(inputs["large"]), "--mask", str(inputs["mask"]), "--num", "1"],
         "--inpaint: ", "is 16x16 pixels; the model takes 8x8 images"),
        (["--invert", str(inputs["large"])], "--invert: ", "the model takes 8x8 images"),
        ([*inpaint, "--sampler", "euler"], "sampler: 'euler' cannot inpaint", "ddpm, ddim"),
        (["--inpaint", str(inputs["image"]), "--num", "1"], "--inpaint and --mask: give both", ""),
        (["--interpolate", "a.npy", "b.npy", "--frames", "1"], "--frames: 1 is not allowed", ">= 2"),
        (["--interpolate", str(inputs["image"]), str(inputs["image"])], "--interpolate: ", "not an .npy"),
        (["--invert", str(inputs["image"]), "--sampler", "ddpm"], "--sampler: 'ddpm' is not allowed", "'ddim'"),
        ([*inpaint[:4], "--num", "0"], "--num: 0 is not allowed", ">= 1"),
    ]
    for extra, start, detail in cases:
        rc, text = _cli(["--model", model, *extra, "--out", out], capsys)
        assert rc == 2 and start in text and detail in text, (extra, text)
    rc, text = _cli(["--model", model, *inpaint, "--out", str(tmp_path / "folder")], capsys)
    assert rc == 2 and "expected a .png file" in text
    rc, text = _cli(["--model", str(sde_export), "--invert", str(inputs["image"]), "--out", out], capsys)
    assert rc == 2 and "objective 'vp_sde' is not allowed; DDIM inversion needs a discrete-time objective" in text
    rc, text = _cli(["--model", model, "--out", out], capsys)  # plain sampling still needs --num
    assert rc == 2 and "--num: required" in text
    assert not Path(out).exists()
