"""unCLIP (DALL-E 2): the diffusion prior over CLIP embeddings and the embedding-conditioned decoder.

The prior is trained on synthetic embeddings with a known conditional law,
    z_img = normalise(Q z_txt + c + sigma n),  z_txt uniform on the sphere, n ~ N(0, I),
so the two baselines of the issue (the text embedding itself; the mean image embedding) and the
oracle (an exact draw from the conditional law) are all computable; its samples for held-out texts
must beat both baselines by 5 standard errors of the paired difference, and land at unit norm. The
same trained prior sampled unconditionally (guidance w = -1: the learned null text) must not beat
the mean-embedding baseline, and the same samples without the sqrt(d) un-scaling must fail the norm
check: both broken variants fail the checks that the correct chain passes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evaluation.unclip import check_chain, decode, sample_prior
from pipeline.config import DiffusionConfig, load_config
from pipeline.diffusion import registry
from pipeline.diffusion.unclip import embedding_guidance, select_by_text_similarity
from pipeline.loading import TrainedModel
from pipeline.models import build_model, build_model_from_dict

ROOT = Path(__file__).resolve().parents[1]
D = 16
SIGMA = 0.15
HELD_OUT = 300


@pytest.fixture
def one_thread():
    """The tiny models here run fastest on one thread of a shared machine (and the result does not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _law():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    c = F.normalize(torch.randn(D, generator=g), dim=0) * 0.8
    return q, c


def _pairs(n: int, gen: torch.Generator, law) -> tuple[torch.Tensor, torch.Tensor]:
    q, c = law
    text = F.normalize(torch.randn(n, D, generator=gen), dim=1)
    return text, F.normalize(text @ q.T + c + SIGMA * torch.randn(n, D, generator=gen), dim=1)


def _trained_prior(steps: int = 300) -> TrainedModel:
    diffusion = DiffusionConfig(objective="unclip_prior", options={"timesteps": 1000})
    objective = registry.build_objective("unclip_prior", diffusion.objective_options())
    torch.manual_seed(0)
    net = build_model("prior_tiny", embed_dim=D, width=64, layers=2, heads=4)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    law, data = _law(), torch.Generator().manual_seed(1)
    for step in range(steps):
        text, image = _pairs(256, data, law)
        out = objective.training_loss(net, torch.zeros(1), None, generator=torch.Generator().manual_seed(step),
                                      cond={"clip_img": image, "clip_txt": text})
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    return TrainedModel(net.eval(), objective, diffusion, {})


def test_prior_beats_both_baselines_and_its_broken_variants_do_not(one_thread):
    prior = _trained_prior()
    law = _law()
    text, truth = _pairs(HELD_OUT, torch.Generator().manual_seed(99), law)
    seeds = list(range(HELD_OUT))
    z = sample_prior(prior, text, seeds, steps=25)
    cos = F.cosine_similarity(z, truth, dim=1)
    mean_image = _pairs(20_000, torch.Generator().manual_seed(5), law)[1].mean(0)
    baselines = {"text": F.cosine_similarity(text, truth, dim=1),
                 "mean image": F.cosine_similarity(mean_image[None], truth, dim=1)}
    for name, base in baselines.items():
        diff = cos - base  # paired over the same held-out pairs
        se = diff.std() / math.sqrt(HELD_OUT)
        assert diff.mean() > 5 * se, (name, float(cos.mean()), float(base.mean()), float(se))
    # the samples are CLIP-unit embeddings: norm 1 within a quarter (without un-scaling it is sqrt(d) = 4)
    assert abs(float(z.norm(dim=1).mean()) - 1.0) < 0.25
    # broken variant 1: the sqrt(d) un-scaling left out fails the norm check
    assert abs(float((z * math.sqrt(D)).norm(dim=1).mean()) - 1.0) > 0.25
    # broken variant 2: the unconditional prior (w = -1, the learned null text) does not beat the mean embedding
    z_null = sample_prior(prior, text, seeds, steps=25, guidance_scale=-1.0)
    diff = F.cosine_similarity(z_null, truth, dim=1) - baselines["mean image"]
    assert not diff.mean() > 5 * diff.std() / math.sqrt(HELD_OUT)


def test_two_candidates_keep_the_one_with_the_higher_dot_product():
    text = F.normalize(torch.randn(5, D, generator=torch.Generator().manual_seed(0)), dim=1)
    cands = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    chosen = select_by_text_similarity(cands, text)
    dots = (cands * text).sum(-1)
    for b in range(5):
        k = int(dots[:, b].argmax())
        assert torch.equal(chosen[b], cands[k, b]) and dots[k, b] >= dots[1 - k, b]
    with pytest.raises(ValueError, match="expected \\(K, B, d\\) and \\(B, d\\)"):
        select_by_text_similarity(cands, text[:4])


def _decoder_net():
    net = build_model("tiny", image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                      norm_groups=4, cond_embed_dim=D, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere (the output layer is zero-initialised)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def test_decoder_guidance_is_conditional_at_w0_and_unconditional_at_wminus1_exactly():
    net = _decoder_net()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5.0, 500.0, 900.0])
    emb = F.normalize(torch.randn(3, D, generator=torch.Generator().manual_seed(3)), dim=1)
    with torch.no_grad():
        conditional, unconditional = net(x, t, emb=emb), net(x, t)
        assert torch.equal(embedding_guidance(net, 0.0, emb)(x, t), conditional)
        assert torch.equal(embedding_guidance(net, -1.0, emb)(x, t), unconditional)
        # the training-time drop (a zero embedding) is the unconditional model
        assert torch.equal(net(x, t, emb=torch.zeros_like(emb)), unconditional)
        w = 3.0
        torch.testing.assert_close(embedding_guidance(net, w, emb)(x, t), (1 + w) * conditional - w * unconditional)
        assert not torch.allclose(conditional, unconditional)  # the embedding reaches the network


def test_decoder_objective_drops_the_embedding_to_zero():
    def objective(p):
        diffusion = DiffusionConfig(objective="unclip_decoder", timesteps=100, options={"embedding_dropout": p})
        return registry.build_objective("unclip_decoder", diffusion.objective_options())

    always, never = objective(1.0), objective(0.0)
    net = _decoder_net()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    emb = F.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(3)), dim=1)

    def loss(objective, e):
        return objective.training_loss(net, x0, None, generator=torch.Generator().manual_seed(7), cond={"clip_img": e})

    assert torch.equal(loss(always, emb).loss, loss(always, torch.zeros_like(emb)).loss)
    assert not torch.allclose(loss(never, emb).loss, loss(never, torch.zeros_like(emb)).loss)
    with pytest.raises(ValueError, match=r"needs the per-sample CLIP embeddings \['clip_img'\]"):
        never.training_loss(net, x0, None)
    with pytest.raises(ValueError, match=r"model.overrides.cond_embed_dim: 16 is not allowed with 8-dimensional"):
        loss(never, emb[:, :8])


def test_prior_network_rebuilds_from_its_config_and_configs_load():
    net = build_model("prior_tiny", embed_dim=D)
    again = build_model_from_dict(dataclasses.asdict(net.config))
    again.load_state_dict(net.state_dict(), strict=True)
    x, t, e = torch.randn(2, D), torch.tensor([1.0, 999.0]), torch.randn(2, D)
    assert torch.equal(net.eval()(x, t, emb=e), again.eval()(x, t, emb=e))
    keep = torch.tensor([True, False])
    dropped = net(x, t, emb=e, emb_keep=keep)
    assert torch.equal(dropped[1], net(x, t)[1]) and torch.equal(dropped[0], net(x, t, emb=e)[0])
    for name in ("unclip_prior_quickstart", "unclip_decoder_quickstart"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert registry.OBJECTIVES[cfg.diffusion.objective].cond_fields


def test_chain_refuses_a_dimension_mismatch_and_the_cli_bad_input_exits_2(tmp_path, capsys):
    from launch import sample as sample_cli

    diffusion = DiffusionConfig(objective="unclip_prior")
    prior = TrainedModel(build_model("prior_tiny", embed_dim=D), registry.build_objective("unclip_prior", None),
                         diffusion, {})
    decoder = TrainedModel(_decoder_net(), registry.build_objective("unclip_decoder", None),
                           DiffusionConfig(objective="unclip_decoder"), {})
    check_chain(prior, decoder, D)
    with pytest.raises(ValueError, match=r"embedding dimension mismatch: the prior takes 16, the decoder takes 16, "
                                         r"the CLIP embedder takes 32"):
        check_chain(prior, decoder, 32)
    with pytest.raises(ValueError, match=r"--prior: the model's objective is 'unclip_decoder'"):
        check_chain(decoder, None, None)
    with pytest.raises(ValueError, match="embedding dimension mismatch"):
        decode(decoder, torch.zeros(1, 8), [0])
    base = ["--model", str(tmp_path), "--out", str(tmp_path / "g.png"), "--num", "2"]
    cases = {
        "empty prompt": (["--prompt", " ", "--prior", str(tmp_path), "--clip-model", "m", "--clip-weights", "w"],
                         "--prompt: prompt 0 is empty"),
        "no prior": (["--prompt", "a red circle"], "--prompt: needs --prior"),
        "no clip": (["--prompt", "a red circle", "--prior", str(tmp_path)], "--clip-model and --clip-weights"),
        "two modes": (["--prompt", "a", "--variations-of", "x.png"], "give exactly one of"),
    }
    for name, (extra, message) in cases.items():
        rc = sample_cli.main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (name, err)
        assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------------------
# The real training loop (single-process DeepSpeed in a subprocess), export, and the sampling CLI

CLIP_DIM = 32  # shapes-micro
TRAIN_BASE = ["data.resolution=8", "data.shuffle_buffer=16", "data.hflip=false", "train.micro_batch=8",
              "train.log_every_images=16", "train.ema_rates=[0.9]", "train.lr=1e-3", "train.collective_timeout_s=120",
              "train.zero_stage=1", "train.total_images=16", "train.checkpoint_every_images=16",
              "train.sample_every_images=0"]
RUNS = {
    "prior": ["model.preset=prior_tiny", f"model.overrides={{embed_dim: {CLIP_DIM}, width: 32, layers: 1, heads: 2}}",
              "diffusion.objective=unclip_prior", "data.fields=[clip_img, clip_txt]"],
    "decoder": ["model.preset=tiny", ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1, 2], "
                                      f"attention_resolutions: [4], norm_groups: 4, cond_embed_dim: {CLIP_DIM}}}"),
                "diffusion.objective=unclip_decoder", "diffusion.timesteps=100", "data.fields=[clip_img]"],
}


def _random_clip(name: str, path: Path) -> str:
    from safetensors.torch import save_file

    from pipeline.data.clip_embed import build_clip

    torch.manual_seed(0)
    model = build_clip(name)[0]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A prior and a decoder trained 16 images each on CLIP-embedded builtin shards (a random shapes-micro CLIP),
    then exported: (root, exports, clip weights)."""
    from test_objectives_integration import TRAIN_CODE  # trains each run of RUNS in one process

    from launch import export as export_cli
    from pipeline.data.prepare import EmbedSpec, prepare_dataset

    root = tmp_path_factory.mktemp("unclip")
    clip = _random_clip("shapes-micro", root / "micro.safetensors")
    data = root / "data"
    prepare_dataset("builtin:shapes10", str(data), shard_size=32, num_samples=64, workers=0, progress=False,
                    embed=EmbedSpec("shapes-micro", clip))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TRAIN_CODE, json.dumps([*TRAIN_BASE, f"data.url={data}"]),
                           json.dumps(RUNS), str(root)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = [json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert [r["name"] for r in done] == list(RUNS) and all(r["images"] == 16 for r in done)
    exports = {}
    for name in RUNS:
        exports[name] = root / name / "export"
        assert export_cli.main(["--run", str(root / name), "--out", str(exports[name])]) == 0
    return root, exports, clip


def test_prior_and_decoder_train_export_and_sample_from_a_prompt(exported, tmp_path, capsys):
    from launch import sample as sample_cli
    from pipeline.loading import load_model

    root, exports, clip = exported
    for name in RUNS:
        losses = [json.loads(x)["loss"] for x in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert losses and all(math.isfinite(v) for v in losses)
    prior = load_model(exports["prior"])
    assert type(prior.network).__name__ == "PriorTransformer" and prior.network.config.embed_dim == CLIP_DIM
    common = ["--model", str(exports["decoder"]),
              "--clip-model", "shapes-micro", "--clip-weights", clip, "--steps", "3", "--num", "2"]
    out = tmp_path / "grid.png"
    rc = sample_cli.main([*common, "--prior", str(exports["prior"]), "--prompt", "a red circle", "--prompt",
                          "a blue triangle", "--prior-steps", "3", "--prior-guidance", "1", "--guidance-scale", "2",
                          "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    from PIL import Image

    assert Image.open(out).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2 prompts x 2 images of 8x8, 2-pixel padding
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompts"] == ["a red circle", "a blue triangle"] and len(record["seeds"]) == 4
    assert record["clip"]["dim"] == CLIP_DIM
    # image variations (DALL-E 2 sec. 3.1) and the slerp between two images' embeddings (sec. 3.2)
    from pipeline.data.builtin import builtin_image

    for i in range(2):
        Image.fromarray(builtin_image("shapes10", i, 3, 8)).save(tmp_path / f"{i}.png")
    decoder_only = common[:-2]  # without --num 2
    assert sample_cli.main([*decoder_only, "--variations-of", str(tmp_path / "0.png"), "--num", "3",
                            "--out", str(tmp_path / "var.png")]) == 0
    assert Image.open(tmp_path / "var.png").size == (4 * 8 + 5 * 2, 8 + 2 * 2)  # the image + 3 variations
    assert sample_cli.main([*decoder_only, "--slerp", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                            "--frames", "3", "--out", str(tmp_path / "slerp.png")]) == 0
    assert Image.open(tmp_path / "slerp.png").size == (5 * 8 + 6 * 2, 8 + 2 * 2)  # A, 3 frames, B
    # bad input: a CLIP model of another dimension, a missing weights file, a prior that is a decoder
    tiny = _random_clip("shapes-tiny", tmp_path / "tiny.safetensors")
    cases = {
        "dimension": (["--clip-model", "shapes-tiny", "--clip-weights", tiny, "--prior", str(exports["prior"]),
                       "--prompt", "a red circle"], "embedding dimension mismatch"),
        "no weights": (["--clip-weights", str(tmp_path / "missing.safetensors"), "--prior", str(exports["prior"]),
                        "--prompt", "a red circle"], "does not exist"),
        "not a prior": (["--prior", str(exports["decoder"]), "--prompt", "a red circle"], "not unCLIP's prior"),
    }
    for name, (extra, message) in cases.items():
        bad = tmp_path / f"{name}.png"
        capsys.readouterr()
        rc = sample_cli.main([*common, *extra, "--out", str(bad)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (name, err[-2000:])
        assert not bad.exists()


def test_preflight_refuses_missing_fields_and_an_image_grid_for_the_prior():
    from pipeline.train.preflight import PreflightError, check_objective_inputs

    decoder = load_config(ROOT / "configs" / "unclip_decoder_quickstart.yaml", ["data.fields=[]"])
    with pytest.raises(PreflightError, match=r"data.fields: \[\] is not allowed for objective 'unclip_decoder': it "
                                             r"trains on \['clip_img'\]"):
        check_objective_inputs(decoder)
    prior = load_config(ROOT / "configs" / "unclip_prior_quickstart.yaml", ["train.sample_every_images=100"])
    with pytest.raises(PreflightError, match=r"train.sample_every_images: 100 is not allowed for objective "
                                             r"'unclip_prior': it generates embeddings"):
        check_objective_inputs(prior)
    check_objective_inputs(load_config(ROOT / "configs" / "unclip_prior_quickstart.yaml"))


def test_slerp_between_embeddings_keeps_unit_norm_and_hits_the_endpoints():
    from evaluation.unclip import interpolate_embeddings

    z = F.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(4)), dim=1)
    path = interpolate_embeddings(z[0], z[1], 5)
    torch.testing.assert_close(path[0], z[0]) and torch.testing.assert_close(path[-1], z[1])
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5))  # a great circle, not a chord
    angles = torch.arccos((path[:-1] * path[1:]).sum(1).clamp(-1, 1))
    torch.testing.assert_close(angles, angles[:1].expand(4))  # equal steps in angle


def _evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_reports_the_clip_score_of_prompts_through_the_prior_with_provenance(exported):
    """launch/evaluate.py --prior-run: the decoder run is sampled from the data's captions through the prior on the
    actor pool; the stored images equal the chain's images drawn in this process for the same prompts and seeds
    (bitwise), the CLIP score equals their mean cosine with the prompts, and the prior, the CLIP model and the
    prompt set are on record. Bad input exits 2 before Ray starts."""
    import hashlib

    import numpy as np

    from evaluation.sampling import read_samples, sample_seeds
    from evaluation.unclip import UnclipSampleFn, evaluation_prompts, prompts_of, score_clip
    from pipeline.data.clip_embed import load_embedder

    root, _, clip = exported
    n = 4
    common = ["--run", str(root / "decoder"), "--clip-model", "shapes-micro", "--clip-weights", clip,
              "--no-progress", "--num-samples", str(n), "--steps", "2", f"eval.samples_per_shard={n}"]
    out = _evaluate_cli(*common, "--prior-run", str(root / "prior"), "--prior-steps", "2", "--metrics", "clip_score",
                        "--bootstrap-resamples", "50")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    [metrics_file] = (root / "decoder" / "eval").glob("*/*-prior*/metrics.json")
    record = json.loads(metrics_file.read_text())
    prompts, _ = evaluation_prompts(str(root / "data"), 1000)
    assert record["unclip"]["prompts"]["count"] == len(prompts) == 64
    assert record["unclip"]["clip"]["weights_sha256"] == hashlib.sha256(Path(clip).read_bytes()).hexdigest()
    prior_source = record["unclip"]["prior"]["source"]
    assert prior_source["run"] == str(root / "prior") and record["unclip"]["prior"]["steps"] == 2

    ref = {"source": str(root / "prior"), "checkpoint": prior_source["images_seen"], "ema_rate": None}
    builder = UnclipSampleFn(str(root / "decoder"), record["checkpoint"]["images_seen"], record["ema_rate"], ref,
                             "shapes-micro", clip, tuple(prompts), prior_steps=2, steps=2, sampler="ddim")
    expected = builder()(np.arange(n), sample_seeds(0, range(n)))
    [stored] = list(read_samples(str(metrics_file.parent), n, n))
    assert np.array_equal(stored, expected)
    score = score_clip(expected, prompts_of(prompts, range(n)), load_embedder("shapes-micro", clip), resamples=0,
                       level=0.95, seed=0)
    assert record["metrics"]["clip_score"] == pytest.approx(score["clip_score"]["value"], abs=1e-6)
    interval = record["intervals"]["clip_score"]
    assert interval["low"] <= record["metrics"]["clip_score"] <= interval["high"]

    cases = {
        "clip_score needs eval.prior_run": ["--metrics", "clip_score"],
        "not unCLIP's prior": ["--prior-run", str(root / "decoder"), "--metrics", "clip_score"],
        "does not exist": ["--prior-run", str(root / "prior"), "--metrics", "clip_score", "--clip-weights",
                           str(root / "missing.safetensors")],
    }
    for message, extra in cases.items():
        bad = _evaluate_cli(*common, *extra)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
