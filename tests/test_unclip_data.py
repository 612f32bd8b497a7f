"""unCLIP's data half: captions in the shards, the small offline CLIP (open_clip), bad input, CLIP score.
(CLIP embeddings computed in Ray prepare tasks on S3 and streamed by the reader as ``data.fields``:
tests/test_data_prepare.py, which shares its module's Ray.)

The CLIP model is trained once per session (``shapes-micro``, 60 steps) and reused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.clip_score import clip_score, prior_baselines, prompt_top1
from pipeline.data.clip_embed import load_embedder
from pipeline.data.prepare import EmbedSpec, prepare_dataset
from pipeline.data.reader import MissingFieldError, ShardReader
from pipeline.data.sources import open_source

FIELDS = ("clip_img", "clip_txt")
TRAIN, HELDOUT = 600, 200


@pytest.fixture(scope="session")
def clip_weights(tmp_path_factory):
    """shapes-micro trained on 600 builtin pairs (60 steps, ~8 s): (weights path, its saved record)."""
    from pipeline.data.clip_train import save_clip, train_clip

    source = open_source("builtin:shapes10", num_samples=TRAIN + HELDOUT)
    result = train_clip(source, "shapes-micro", num_train=TRAIN, num_heldout=HELDOUT, steps=60, batch_size=128,
                        threads=1, progress=False)
    path = str(tmp_path_factory.mktemp("clip") / "micro.safetensors")
    return path, save_clip(result, path)


def test_tiny_clip_ranks_captions_to_their_class_and_reloads_identically(clip_weights):
    path, record = clip_weights
    r = record["heldout_retrieval"]
    # Null: a random image shares the caption's class with p = 1/10 (classes cycle); over M = 200
    # held-out captions the class top-1 of an embedding that knows nothing is Binomial(M, p)/M, sd
    # sqrt(p(1-p)/M) = 0.021. Require 5 sd above it.
    p = r["class_chance"]
    assert p == pytest.approx(0.1)
    assert r["class_top1"] > p + 5 * math.sqrt(p * (1 - p) / HELDOUT), r
    # The weights file round-trips: the loaded model gives the retrieval the trained one measured.
    from pipeline.data.clip_train import retrieval_top1

    emb = load_embedder("shapes-micro", path)
    assert emb.identity() == {k: record[k] for k in ("name", "model", "weights_sha256", "dim")}
    held = open_source("builtin:shapes10", num_samples=TRAIN + HELDOUT).read(TRAIN, TRAIN + HELDOUT, 32)
    again = retrieval_top1(emb.embed_texts([x.caption for x in held]), emb.embed_images(np.stack([x.image for x in held])),
                           torch.tensor([x.label for x in held]))
    assert again == r
    # uint8 NHWC and float NCHW in [-1, 1] are the same images
    u8 = np.stack([x.image for x in held[:4]])
    f = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert torch.allclose(emb.embed_images(u8), emb.embed_images(f), atol=1e-6)
    assert torch.allclose(emb.embed_images(u8).norm(dim=1), torch.ones(4), atol=1e-6)


def test_folder_sidecars_and_npz_captions_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    captions = ["un cercle rouge \u00e9t\u00e9", "a green square", "two dots", "a bar, white", "\u2603 snow"]
    (tmp_path / "imgs").mkdir()
    for i, (im, cap) in enumerate(zip(images, captions)):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i:02d}.png")
        (tmp_path / "imgs" / f"{i:02d}.txt").write_text(cap + "\n", encoding="utf-8")
    np.savez(tmp_path / "arr.npz", arr_0=images, captions=np.array(captions))
    for src, name in ((str(tmp_path / "imgs"), "folder"), (str(tmp_path / "arr.npz"), "npz")):
        res = prepare_dataset(src, str(tmp_path / name), shard_size=2, workers=0, progress=False)
        assert res.manifest.captions and res.manifest.embedder is None
        sidecar = tmp_path / name / "shards" / "shard-000000.tar"
        assert sidecar.exists()
        reader = ShardReader(str(tmp_path / name), batch_size=1, hflip=False, shuffle_buffer=1, with_keys=True)
        assert len(next(iter(reader))) == 3  # no fields asked: the batch is unchanged
    import tarfile

    with tarfile.open(tmp_path / "npz" / "shards" / "shard-000001.tar") as tar:
        assert tar.extractfile("000000002.txt").read().decode() == captions[2]
    with tarfile.open(tmp_path / "folder" / "shards" / "shard-000002.tar") as tar:
        assert tar.extractfile("000000004.txt").read().decode() == captions[4]
    # some images with captions, some without: refused, naming the missing caption file
    (tmp_path / "imgs" / "03.txt").unlink()
    with pytest.raises(ValueError, match=r"03\.txt"):
        open_source(str(tmp_path / "imgs"))


def test_bad_inputs_exit_2_with_a_message(clip_weights, tmp_path, capsys):
    from launch import prepare_data, train

    plain = str(tmp_path / "plain")
    prepare_dataset("builtin:shapes10", plain, shard_size=4, num_samples=8, workers=0, progress=False)
    # missing CLIP weights: nothing is downloaded, nothing is written
    missing = str(tmp_path / "none.safetensors")
    code = prepare_data.main(["--source", "builtin:shapes10", "--out", str(tmp_path / "x"), "--num-samples", "8",
                              "--embed", "clip", "--clip-model", "shapes-micro", "--clip-weights", missing])
    assert code == 2 and "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert prepare_data.main(["--source", "builtin:shapes10", "--out", str(tmp_path / "x"), "--embed", "clip"]) == 2
    assert "--clip-weights" in capsys.readouterr().err
    code = prepare_data.main(["--source", "builtin:shapes10", "--out", str(tmp_path / "x"), "--embed", "clip",
                              "--clip-model", "nope", "--clip-weights", clip_weights[0]])
    assert code == 2 and "shapes-micro" in capsys.readouterr().err
    from launch import train_clip

    assert train_clip.main(["--out", str(tmp_path / "clip.pt")]) == 2 and ".safetensors" in capsys.readouterr().err
    np.savez(tmp_path / "nocap.npz", arr_0=np.zeros((8, 8, 8, 3), np.uint8))
    assert train_clip.main(["--source", str(tmp_path / "nocap.npz"), "--out", str(tmp_path / "c.safetensors"),
                            "--num-train", "4", "--num-heldout", "4"]) == 2
    assert "no captions" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()
    with pytest.raises(ValueError, match="do not fit model 'shapes-tiny'"):
        load_embedder("shapes-tiny", clip_weights[0])
    with pytest.raises(ValueError, match="empty"):
        load_embedder("shapes-micro", clip_weights[0]).embed_texts(["a red circle", " "])

    # training asks for embeddings the shards do not have: exit 2 before Ray starts
    base = [f"data.url={plain}", f"train.run_dir={tmp_path / 'run'}", "data.fields=[clip_img,clip_txt]"]
    assert train.main(base) == 2
    err = capsys.readouterr().err
    assert "data.fields" in err and "--embed clip" in err
    with pytest.raises(MissingFieldError, match="no per-sample embeddings"):
        ShardReader(plain, batch_size=2, fields=FIELDS)

    # embedding dimension of the data (32) vs the network's (64): exit 2 naming both
    emb_url = str(tmp_path / "emb")
    prepare_dataset("builtin:shapes10", emb_url, shard_size=4, num_samples=8, workers=0, progress=False,
                    embed=EmbedSpec("shapes-micro", clip_weights[0]))
    assert train.main([f"data.url={emb_url}", f"train.run_dir={tmp_path / 'run'}", "data.fields=[clip_img]",
                       "model.overrides.cond_embed_dim=64"]) == 2
    err = capsys.readouterr().err
    assert "cond_embed_dim: 64" in err and "dimension 32" in err
    # an objective that takes no cond= cannot use the fields
    assert train.main([f"data.url={emb_url}", f"train.run_dir={tmp_path / 'run'}", "data.fields=[clip_img]"]) == 2
    assert "no per-sample conditioning" in capsys.readouterr().err

    # a manifest that claims embeddings over shards without them: the reader names field and shard
    doc = json.loads((tmp_path / "plain" / "dataset.json").read_text())
    doc["embedder"] = {"name": "open_clip", "model": "shapes-micro", "weights_sha256": "0" * 64, "dim": 32}
    (tmp_path / "plain" / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(MissingFieldError, match=r"'clip_txt' is missing in shard .*shard-00000\d\.tar"):
        next(iter(ShardReader(plain, batch_size=2, fields=("clip_txt",))))


def test_clip_score_and_prior_baselines_against_known_cosines():
    # pairs at known angles in the plane: cos = c_i exactly, in 16 dimensions with noise-free padding
    n, d = 400, 16
    c = torch.linspace(-0.2, 0.9, n, dtype=torch.float64)
    image = torch.zeros(n, d, dtype=torch.float64)
    image[:, 0] = 1.0
    text = torch.zeros(n, d, dtype=torch.float64)
    text[:, 0], text[:, 1] = c, torch.sqrt(1 - c**2)
    out = clip_score(image * 3.0, text, resamples=2000, seed=1)  # any scale: cosines
    assert out["clip_score"]["value"] == pytest.approx(float(c.mean()), abs=1e-12)
    lo, hi = out["clip_score"]["interval"]["low"], out["clip_score"]["interval"]["high"]
    # the percentile interval of a mean: about +-1.96 sd/sqrt(n)
    half = 1.96 * float(c.std()) / math.sqrt(n)
    assert lo < float(c.mean()) < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert clip_score(image, text, resamples=200, seed=1) == clip_score(image, text, resamples=200, seed=1)

    # the prior's baselines: a perfect prior scores 1; the text baseline is the c_i; the mean image e_0
    base = prior_baselines(image, text, image, image.mean(0), resamples=500)
    assert base["prior"]["value"] == pytest.approx(1.0)
    assert base["text"]["value"] == pytest.approx(float(c.mean()))
    assert base["mean_image"]["value"] == pytest.approx(1.0)
    assert base["prior_minus_text"]["interval"]["low"] > 0

    # prompt ranking: each image's nearest prompt is its own; with shuffled assignments, chance
    prompts = torch.eye(4, d, dtype=torch.float64)
    which = torch.arange(n) % 4
    imgs = prompts[which] + 0.1 * torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert prompt_top1(imgs, prompts, which)["top1"] == 1.0
    shuffled = prompt_top1(imgs, prompts, which[torch.randperm(n, generator=torch.Generator().manual_seed(1))])
    assert abs(shuffled["top1"] - 0.25) < 5 * shuffled["sd_at_chance"]
