"""The plug-in seams: objective and sampler registries, the one sampling entry, the one loader.

The oracle checks drive the registry's own entry (``registry.sample``) with the Gaussian
mixture's closed-form model adapted to each objective's parameterisation, and use the
posterior-weighted statistics of tests/test_samplers_oracle.py (weights, means, covariances within
5 SE at N = 3000: a correct sampler fails one of the ~30 checks with probability ~1e-5).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.diffusion import GaussianMixture, build_schedule, oracle_model, registry
from pipeline.diffusion.registry import OBJECTIVES, SAMPLERS, make_view, sample, samplers_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_samplers_oracle import assert_reproduces_mixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 3000


def _discrete_oracle_view(gm, parameterization="eps"):
    schedule = build_schedule("cosine", 1000)
    options = registry.objective_options("ddpm", top_level={"schedule": "cosine", "parameterization": parameterization,
                                                            "variance": "fixed_small"})
    objective = registry.build_objective("ddpm", options)
    return make_view("ddpm", oracle_model(gm, schedule, parameterization), objective, options)


def _vp_oracle_view(gm):
    """The VP SDE's closed-form eps network: net(x, 999 t) = -sigma(t) grad log p_t(x)."""
    options = registry.objective_options("vp_sde", {})
    objective = registry.build_objective("vp_sde", options)
    sde = objective.sde

    def net(x, t_input, y=None):
        t = (t_input / 999.0).to(torch.float64)
        alpha, sigma = sde.marginal(t)
        return -sigma[:, None] * gm.score(x, alpha, sigma)

    return make_view("vp_sde", net, objective, options)


def _draw(view, sampler, steps, seed0, **options):
    return sample(view, sampler, (N, 2), torch.arange(N) + seed0, steps=steps,
                  options={"clip_denoised": False, **options}).to(torch.float64)


def test_euler_reproduces_the_mixture_through_the_registry():
    """EDM's Euler (Algorithm 1 without the 2nd-order step), 256 Karras levels snapped to the trained ones."""
    gm = GaussianMixture.example_2d()
    assert_reproduces_mixture(_draw(_discrete_oracle_view(gm), "euler", 256, 0), gm)


@pytest.mark.parametrize("eta,steps", [(0.0, 200), (1.0, 1000)])
def test_ddim_for_the_vp_sde_reproduces_the_mixture(eta, steps):
    """DDIM in sigma form on times uniform in t: deterministic (eta 0, 200 steps) and ancestral (eta 1).

    Measured once at N = 3000: the ancestral form under-disperses the narrowest component by ~18%
    of its variance at 200 steps, ~12% at 500 and ~2% at 1000 (a uniform t grid is coarse at low
    noise for the VP SDE with beta_max = 20), so it is checked at 1000 steps; eta 0 is unbiased
    within the band at 200."""
    gm = GaussianMixture.example_2d()
    assert_reproduces_mixture(_draw(_vp_oracle_view(gm), "ddim", steps, 5 * N, eta=eta), gm)


def test_the_oracle_check_catches_a_broken_euler_step():
    """The same check fails for Euler with a 10% too short step (a deliberately broken variant)."""
    from pipeline.diffusion import fast_samplers

    gm = GaussianMixture.example_2d()
    view = _discrete_oracle_view(gm)
    sigmas = view.karras(256)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sigmas[0])
    denoiser = view.denoiser(None)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = x + 0.9 * (s_next - s) * (x - denoiser(x, fast_samplers._level(x, s))) / s
    with pytest.raises(AssertionError):
        assert_reproduces_mixture(x, gm)


def test_every_generative_objective_has_a_default_sampler_that_fits_it():
    for name, spec in OBJECTIVES.items():
        fits = samplers_for(name)
        assert spec.generative == bool(fits), name
        if spec.generative:
            assert spec.default_sampler in fits
    assert set(samplers_for("ddpm")) >= {"euler", "ddim"} and {"euler", "ddim"} <= set(samplers_for("vp_sde"))


def test_config_choices_and_cli_help_come_from_the_registries():
    from pipeline.config import DiffusionConfig, EvalConfig

    assert DiffusionConfig.model_fields["objective"].annotation.__args__ == tuple(OBJECTIVES)
    assert EvalConfig.model_fields["sampler"].annotation.__args__ == tuple(SAMPLERS)
    text = registry.describe_samplers()
    for name, spec in OBJECTIVES.items():
        assert (f"{name}: " in text) == spec.generative


def test_objective_options_are_typed_with_did_you_mean():
    cfg = load_config(None, ["diffusion.objective=vp_sde", "diffusion.options={beta_max: 10, weighting: likelihood}"])
    options = cfg.diffusion.objective_options()
    assert options.beta_max == 10.0 and options.weighting == "likelihood"
    with pytest.raises(ConfigError, match=r"diffusion\.options\.beta_mx: unknown key \(did you mean 'beta_max'\?\)"):
        load_config(None, ["diffusion.objective=vp_sde", "diffusion.options={beta_mx: 10}"])
    with pytest.raises(ConfigError, match=r"parameterization: value 'v' is not allowed"):
        load_config(None, ["diffusion.objective=ve_sde", "diffusion.options={parameterization: v}"])
    with pytest.raises(ConfigError, match=r"diffusion\.options: \['beta_max'\] not allowed for objective 'ddpm'"):
        load_config(None, ["diffusion.options={beta_max: 10}"])
    with pytest.raises(ConfigError, match=r"diffusion\.objective: value 'ddpm_sde' is not allowed"):
        load_config(None, ["diffusion.objective=ddpm_sde"])


def test_every_objective_module_has_the_same_call():
    """Per-example losses from (net, x0, y, generator); the same generator seed gives the same losses."""
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    y = torch.tensor([0, 1, 2, 3])

    def net(x, t, y=None, **cond):  # cond: e.g. the upsampler's low_res; x (B, d): the unCLIP prior's embeddings
        return 0.1 * x if x.ndim == 2 or x.shape[1] == 3 else 0.1 * x[:, :3]

    def classifier(x, t):
        return x.mean((2, 3)).repeat(1, 2)[:, :4]

    for name in OBJECTIVES:
        objective = registry.build_objective(name, None)
        model = classifier if not OBJECTIVES[name].generative else net
        # per-sample extras an objective declares (unCLIP's CLIP embeddings) come as cond=
        cond = {field: torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(i)),
                                                     dim=1) for i, field in enumerate(OBJECTIVES[name].cond_fields)}
        kwargs = {"cond": cond} if cond else {}
        runs = [objective.training_loss(model, x0, y, generator=torch.Generator().manual_seed(7), **kwargs)
                for _ in range(2)]
        assert runs[0].loss.shape == (4,) and torch.isfinite(runs[0].loss).all(), name
        assert torch.equal(runs[0].loss, runs[1].loss), name


LITERAL_ALLOWED = {
    # 'classifier' is the architecture name of the noisy-classifier network (the models' own namespace)
    ("pipeline/models/__init__.py", "classifier"), ("pipeline/models/classifier.py", "classifier"),
    # RePaint's step rule, an argument of inpaint_sample itself ('ddpm' ancestral or 'ddim' steps)
    ("pipeline/diffusion/inpainting.py", "ddpm"), ("pipeline/diffusion/inpainting.py", "ddim"),
    # 'ddimN': Improved DDPM's notation for DDIM-style respacing of a schedule
    ("pipeline/diffusion/schedules.py", "ddim"),
    # the PC sampler's corrector kind and an ODE solver method of ode_sample
    ("pipeline/diffusion/sde.py", "langevin"), ("pipeline/diffusion/sde.py", "heun"),
    # a key of metrics.json's guidance record
    ("evaluation/evaluate.py", "classifier"),
    # the name of a demo (launch/demo.py --only representation), which trains that objective
    ("launch/demo.py", "representation"),
}


def test_objective_and_sampler_names_are_written_in_the_registry_only():
    names = set(OBJECTIVES) | set(SAMPLERS)
    found = set()
    for pkg in ("pipeline", "evaluation", "launch"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "pipeline/diffusion/registry.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                        and id(node) not in docstrings):
                    found.add((rel, node.value))
    assert found <= LITERAL_ALLOWED, sorted(found - LITERAL_ALLOWED)
