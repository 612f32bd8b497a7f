"""The Gaussian-mixture oracle through the front door: every (objective, sampler) pair as users call it.

Each pair is driven through ``registry.sample`` on the view ``registry.make_view`` builds, with the
mixture's closed-form model as the network, adapted to the objective's parameterisation and
noise input: DDPM (eps at original timesteps), the VP / sub-VP / VE SDEs (eps = -sigma score at
``sde.noise_input(t)``), NCSN (eps at log sigma, x = x0 + sigma n) and VDM (eps at
``objective.noise_input(gamma)``, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)).

The check (:func:`mixture_statistics`): 19 sample means of per-sample functions whose expectation
under the mixture is known exactly, because E_p[p(k | x) f(x)] = pi_k E[f(x) | k]:
  w_k       = p(k | x)                               -> pi_k
  m_k,a     = p(k | x) u_k,a / pi_k                  -> 0     (u_k = L_k^-1 (x - mu_k), L_k L_k^T = Sigma_k)
  S_k,ab    = p(k | x) u_k,a u_k,b / pi_k            -> I_ab  (whitened covariance, entries 00, 11, 01)
  var       = sum_k p(k | x) |u_k|^2 / D             -> 1     (pooled variance statistic)
Each is a plain sample mean, so its standard error is the per-sample std / sqrt(N) (CLT).
Bias: each pair's discretisation bias per statistic was measured ONCE at N_BIAS samples with seeds
disjoint from the test's (``python tests/test_oracle_front_door.py measure N ids...``) and is stated
in :data:`BIAS`; statistics within 2 SE of 0 at that N are stated as 0. A test requires
|estimate - truth - bias| <= Z sqrt(se^2 + se_bias^2) for every statistic, Z = 5.

False failures (two-sided 5 sigma: 5.7e-7 per statistic, union bound over a test's statistics):
  pairs (19 statistics)                 1.1e-5 per test
  guided (19 + label agreement)         1.2e-5 per test
  inpainting (2), loss values (1-2)     1.1e-6, <= 1.1e-6
Power against a 5% variance error (every component's spread scaled by sqrt(1.05), which moves the
pooled 'var' statistic by 0.043, measured by :func:`inflate`; its per-sample std is ~1):
  pairs, N = 40000, N_BIAS = 100000      SE 0.0059 -> 7.3 SE -> power 0.99
  guided and PC, N = 20000, 100000      SE 0.0078 -> 5.5 SE -> power 0.71
  inpainting, N = 20000, 200000         var / v: SE 0.0105 -> 4.8 SE -> power 0.41
Each check is shown to raise on a deliberately broken variant (tests ``test_a_*_fails`` and
``test_exact_samples_pass_and_a_5_percent_variance_error_fails``).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pipeline.diffusion import GaussianMixture, registry
from pipeline.diffusion.registry import make_view, sample, samplers_for

sys.path.insert(0, str(Path(__file__).resolve().parent))

GM = GaussianMixture.example_2d()
K, D = GM.num_components, GM.dim
Z = 5.0  # two-sided 5-sigma band: 5.7e-7 per statistic
N_TEST = 40_000
N_BIAS = 100_000  # the offline bias measurement (its SE enters every bound)
N_GUIDED, N_BIAS_GUIDED = 20_000, 100_000  # guided sampling and the PC corrector
N_INPAINT, N_BIAS_INPAINT = 20_000, 200_000


@pytest.fixture(autouse=True)
def _one_thread():
    """These are many small (N x 2) tensor ops: one intra-op thread avoids the pool's overhead (and its
    spin-waits on a shared machine); the previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# The oracle, fast: one noise level per call (samplers pass one t for the whole batch)


class Oracle:
    """gm.score with closed-form 2x2 inverses, vectorised over per-example noise levels (parity with
    ``GaussianMixture.score`` is tested below); labels y >= K mean 'no class' (the CFG null label)."""

    def __init__(self, gm: GaussianMixture):
        if gm.dim != 2:
            raise ValueError(f"gm: dimension {gm.dim} is not allowed; the fast oracle is 2-D")
        self.gm = gm

    def _terms(self, x: torch.Tensor, alpha, sigma):
        """Per component: log pi_k N(x; alpha mu_k, C_k) (up to a constant) and C_k^-1 (x - alpha mu_k)."""
        gm = self.gm
        x64 = x.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64) ** 2
        logits, sols = [], []
        for k in range(gm.num_components):  # C_k = alpha^2 Sigma_k + sigma^2 I, closed-form 2x2 inverse
            (v00, v01), (_, v11) = gm.covs[k].tolist()
            c00, c11, c01 = a**2 * v00 + s2, a**2 * v11 + s2, a**2 * v01
            det = c00 * c11 - c01**2
            d0, d1 = x64[:, 0] - a * float(gm.means[k, 0]), x64[:, 1] - a * float(gm.means[k, 1])
            s0, s1 = (c11 * d0 - c01 * d1) / det, (c00 * d1 - c01 * d0) / det
            sols.append((s0, s1))
            logits.append(math.log(float(gm.weights[k])) - 0.5 * (d0 * s0 + d1 * s1 + torch.log(det)))
        return torch.stack(torch.broadcast_tensors(*logits), -1), sols

    def class_log_posterior(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """log p(k | x_t), differentiable in x (the exact noisy classifier)."""
        return torch.log_softmax(self._terms(x, alpha, sigma)[0], -1).to(x.dtype)

    def score(self, x: torch.Tensor, alpha, sigma, y: torch.Tensor | None = None) -> torch.Tensor:
        gm = self.gm
        logits, sols = self._terms(x, alpha, sigma)
        resp = torch.softmax(logits, -1)
        if y is not None:
            y = y.to(x.device).long()
            cond = y < gm.num_components
            if cond.any():
                resp[cond] = torch.nn.functional.one_hot(y[cond], gm.num_components).to(torch.float64)
        out0 = -sum(resp[:, k] * sols[k][0] for k in range(gm.num_components))
        out1 = -sum(resp[:, k] * sols[k][1] for k in range(gm.num_components))
        return torch.stack([out0, out1], -1)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """p(k | x) of the clean mixture."""
        return self.gm.class_log_posterior(x.to(torch.float64), 1.0, 0.0).exp()

    def eps_net(self, alpha_sigma, offset: torch.Tensor | None = None):
        """net(x, t_input, y) = -sigma grad log p_t(x) (+ ``offset``: a deliberate error) with
        (alpha, sigma) = alpha_sigma(t_input) per example."""

        def net(x, t_input, y=None, **_):
            a, s = alpha_sigma(t_input.detach().to(torch.float64).cpu().expand(x.shape[0]))
            out = -s[:, None] * self.score(x, a, s, y)
            return (out if offset is None else out + offset).to(x.dtype)

        return net


# ---------------------------------------------------------------------------------------------
# Each objective's oracle view


def _vdm_alpha_sigma(objective):
    def alpha_sigma(t_input):
        gamma = objective.gamma_min + t_input * (objective.gamma_max - objective.gamma_min) / 1000.0
        return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()  # VDM eq. 3: alpha^2 = sigmoid(-gamma)

    return alpha_sigma


def oracle_view(objective: str, gm: GaussianMixture = GM, options: dict | None = None):
    """(view, objective module, alpha_sigma of the network's t input) with the oracle as the network."""
    spec = registry.OBJECTIVES[objective]
    typed = registry.objective_options(objective, None if spec.top_level else options,
                                       options if spec.top_level else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # VDM's learned schedule: a fixed initialisation
        module = registry.build_objective(objective, typed)
    if spec.discrete:
        abar = module.schedule.alphas_cumprod

        def alpha_sigma(t_input):
            a = abar[t_input.round().long()]  # the original timestep
            return a.sqrt(), (1 - a).sqrt()
    elif objective == "ncsn":
        def alpha_sigma(t_input):
            return torch.ones_like(t_input), torch.exp(t_input)  # NCSN: x = x0 + sigma n, input log sigma
    elif objective == "vdm":
        alpha_sigma = _vdm_alpha_sigma(module)
    else:
        sde = module.sde
        t_of_input = {"vp": lambda u: u / 999.0, "subvp": lambda u: u / 999.0,
                      "ve": lambda u: torch.log(torch.exp(u) / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)}

        def alpha_sigma(t_input):
            t = t_of_input[sde.name](t_input)
            torch.testing.assert_close(sde.noise_input(t), t_input)  # the inverse of the SDE's noise input
            return sde.marginal(t)
    net = Oracle(gm).eps_net(alpha_sigma)
    return make_view(objective, net, module, typed), module, alpha_sigma


# ---------------------------------------------------------------------------------------------
# The statistics


STAT_NAMES = ([f"w{k}" for k in range(K)] + [f"m{k}{a}" for k in range(K) for a in range(D)]
              + [f"S{k}{ab}" for k in range(K) for ab in ("00", "11", "01")] + ["var"])


def per_sample_statistics(x: torch.Tensor, gm: GaussianMixture = GM) -> torch.Tensor:
    """(N, 19) per-sample functions whose means are the statistics of the module docstring."""
    x = x.to(torch.float64)
    post = gm.class_log_posterior(x, 1.0, 0.0).exp()  # (N, K)
    chol = torch.linalg.cholesky(gm.covs)
    u = torch.linalg.solve_triangular(chol[None], (x[:, None, :] - gm.means[None]).unsqueeze(-1), upper=False)
    u = u.squeeze(-1)  # (N, K, D) whitened deviations
    rel = post / gm.weights  # p(k | x) / pi_k
    cols = [post]
    cols.append((rel[..., None] * u).reshape(len(x), -1))
    second = torch.stack([u[..., 0] ** 2, u[..., 1] ** 2, u[..., 0] * u[..., 1]], -1)  # (N, K, 3)
    cols.append((rel[..., None] * second).reshape(len(x), -1))
    cols.append(((post * (u**2).sum(-1)).sum(-1) / gm.dim)[:, None])
    return torch.cat(cols, 1)


def truth(gm: GaussianMixture = GM) -> torch.Tensor:
    eye = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    return torch.cat([gm.weights, torch.zeros(K * D, dtype=torch.float64), eye.repeat(K), torch.ones(1, dtype=torch.float64)])


def mixture_statistics(x: torch.Tensor, gm: GaussianMixture = GM) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate - truth, standard error) per statistic."""
    f = per_sample_statistics(x, gm)
    return f.mean(0) - truth(gm), f.std(0) / math.sqrt(len(f))


def check_mixture(x: torch.Tensor, bias: dict[str, float] | None = None, *, gm: GaussianMixture = GM,
                  n_bias: int = N_BIAS, what: str = "") -> None:
    """Every statistic within Z combined SE of truth + the stated bias (AssertionError naming them)."""
    assert torch.isfinite(x).all(), f"{what}: non-finite samples"
    err, se = mixture_statistics(x, gm)
    b = torch.tensor([float((bias or {}).get(n, 0.0)) for n in STAT_NAMES], dtype=torch.float64)
    se_b = se * math.sqrt(len(x) / n_bias)  # the bias measurement's own SE (same per-sample spread)
    bound = Z * (se**2 + se_b**2).sqrt()
    bad = [f"{n}: err {e:+.4f} (stated bias {bb:+.4f}, bound {t:.4f})"
           for n, e, bb, t in zip(STAT_NAMES, err.tolist(), b.tolist(), bound.tolist()) if abs(e - bb) > t]
    assert not bad, f"{what}: " + "; ".join(bad)


# ---------------------------------------------------------------------------------------------
# The pairs: steps, options and the measured bias (stats within 2 SE of 0 at N_BIAS stated as 0)


@dataclass(frozen=True)
class Pair:
    objective: str
    sampler: str
    steps: int
    options: dict = field(default_factory=dict)  # objective options
    sampler_options: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.objective}-{self.sampler}{self.steps}"

    @property
    def bias(self) -> dict:
        return BIAS[self.id]


DDPM_OPTIONS = {"schedule": "cosine", "parameterization": "eps", "variance": "fixed_small"}
NO_CLIP = {"clip_denoised": False}
PREDICTOR_ONLY = {"corrector_steps": 0}  # with the corrector: test_pc_with_the_corrector_through_the_registry_...
NCSN_OPTIONS = {"sigma_max": 1.0, "sigma_min": 0.01, "num_scales": 10}
VDM_OPTIONS = {"schedule": "learned", "hidden": 16}

PAIRS = [
    Pair("ddpm", "ddpm", 250, DDPM_OPTIONS, NO_CLIP),
    Pair("ddpm", "ddim", 100, DDPM_OPTIONS, NO_CLIP),
    Pair("ddpm", "edm", 100, DDPM_OPTIONS),  # snapped to trained levels: 100 -> 47 steps
    Pair("ddpm", "dpm_solver", 100, DDPM_OPTIONS),
    Pair("ddpm", "euler", 256, DDPM_OPTIONS),
    *[p for obj in ("vp_sde", "subvp_sde", "ve_sde") for p in (
        Pair(obj, "pc", 250, sampler_options=PREDICTOR_ONLY),
        Pair(obj, "ode", 1),
        Pair(obj, "heun", 100),
        Pair(obj, "ddim", 200),
        Pair(obj, "edm", 40),
        Pair(obj, "dpm_solver", 40),
        Pair(obj, "euler", 256),
    )],
    Pair("ncsn", "langevin", 30, NCSN_OPTIONS, {"langevin_step_lr": 6e-5}),
    Pair("vdm", "ddpm", 250, VDM_OPTIONS),
]


def draw(pair: Pair, n: int, seed0: int, **kw) -> torch.Tensor:
    view, _, _ = oracle_view(pair.objective, GM, pair.options)
    return sample(view, pair.sampler, (n, D), torch.arange(n) + seed0, steps=pair.steps,
                  options=pair.sampler_options, **kw).to(torch.float64)


# Objectives conditioned on an input the 2-D mixture does not have (the upsampler's low-resolution
# image, the representation model's code, unCLIP's CLIP embeddings). Their views are the ddpm
# objective's DiscreteView (the unCLIP prior's with x0 prediction and the fixed-small variance; x0
# prediction against the oracle: tests/test_samplers_oracle.py), so their samplers run the same code
# as the ddpm pairs above; their
# conditioning is tested in tests/test_cascade.py, tests/test_representation.py and
# tests/test_unclip.py (the decoder at w = 0 / -1 exactly; the prior against its baselines).
CONDITIONED = {"upsampler", "representation", "unclip_prior", "unclip_decoder"}


def test_the_pairs_are_every_pair_the_registry_allows():
    assert {(p.objective, p.sampler) for p in PAIRS} == {
        (o, s) for o, spec in registry.OBJECTIVES.items() if spec.generative and o not in CONDITIONED
        for s in samplers_for(o)}


def test_the_fast_oracle_is_gm_score():
    """Parity of the closed-form 2x2 path with GaussianMixture.score (unconditional and per class)
    and with its exact noisy classifier."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3] * 16)  # 3: the null label, unconditional
    oracle = Oracle(GM)
    for a, s in ((1.0, 0.01), (0.8, 0.6), (0.01, 1.0), (1.0, 30.0)):
        torch.testing.assert_close(oracle.score(x, a, s), GM.score(x, a, s), rtol=1e-9, atol=1e-9)
        cond = y < K
        torch.testing.assert_close(oracle.score(x, a, s, y)[cond], GM.score(x[cond], a, s, y[cond]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(oracle.class_log_posterior(x, a, s), GM.class_log_posterior(x, a, s),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pair", PAIRS, ids=[p.id for p in PAIRS])
def test_every_pair_reproduces_the_mixture(pair):
    """Weights, whitened means and covariances per component, and the pooled variance, within
    5 combined SE of truth + the pair's measured bias (false failure 1.1e-5; power 0.99 against a
    5% variance error; see the module docstring)."""
    check_mixture(draw(pair, N_TEST, 0), pair.bias, what=pair.id)


# ---------------------------------------------------------------------------------------------
# Guidance: classifier-free with the exact conditional and unconditional oracles, classifier
# guidance with the exact noisy classifier. Labels y ~ pi, so the target is again the mixture
# (each sample from its class); "agree" = mean p(y | x) adds the label check.


def labels(n: int, seed: int) -> torch.Tensor:
    return torch.multinomial(GM.weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def agreement_truth(m: int = 400_000) -> tuple[float, float]:
    """E[p(y | x)] for (x, y) from the mixture, by exact sampling: (value, its SE)."""
    x, y = GM.sample(m, torch.Generator().manual_seed(12345))
    agree = Oracle(GM).posterior(x).gather(1, y[:, None]).squeeze(1)
    return float(agree.mean()), float(agree.std()) / math.sqrt(m)


def check_agreement(x: torch.Tensor, y: torch.Tensor, bias: float, what: str, n_bias: int = N_BIAS,
                    independent: bool = False) -> None:
    """|mean p(y | x) - E_true - bias| <= Z sqrt(se^2 + se_bias^2 + se_ref^2); E_true = sum_k pi_k^2
    exactly when the samples ignore their labels (``independent``)."""
    agree = Oracle(GM).posterior(x).gather(1, y[:, None].long()).squeeze(1)
    ref, se_ref = (float((GM.weights**2).sum()), 0.0) if independent else agreement_truth()
    se = float(agree.std()) / math.sqrt(len(x))
    bound = Z * math.sqrt(se**2 * (1 + len(x) / n_bias) + se_ref**2)
    err = float(agree.mean()) - ref
    assert abs(err - bias) <= bound, f"{what}: agree err {err:+.4f} (stated bias {bias:+.4f}, bound {bound:.4f})"


@dataclass(frozen=True)
class Guided:
    objective: str
    sampler: str
    steps: int
    kind: str  # 'cfg' (guidance_scale w, null class K) or 'classifier' (cond_fn of the exact noisy classifier)
    options: dict = field(default_factory=dict)
    sampler_options: dict = field(default_factory=dict)
    w: float = 1.0  # the CFG scale; -1 is the unconditional model (the null label only)

    @property
    def id(self) -> str:
        return f"{self.kind}{self.w:+g}-{self.objective}-{self.sampler}{self.steps}" if self.kind == "cfg" else \
            f"{self.kind}-{self.objective}-{self.sampler}{self.steps}"

    @property
    def bias(self) -> dict:
        return BIAS[self.id]

    @property
    def agree_bias(self) -> float:
        return AGREE_BIAS[self.id]


GUIDED = [
    Guided("ddpm", "ddim", 100, "classifier", DDPM_OPTIONS, NO_CLIP),
    Guided("ddpm", "ddpm", 250, "classifier", DDPM_OPTIONS, NO_CLIP),
    Guided("ddpm", "ddim", 100, "cfg", DDPM_OPTIONS, NO_CLIP, w=-1.0),
    Guided("vp_sde", "edm", 40, "cfg", w=-1.0),
    Guided("vdm", "ddpm", 250, "cfg", VDM_OPTIONS, w=-1.0),
    Guided("ddpm", "ddim", 100, "cfg", DDPM_OPTIONS, NO_CLIP),
    Guided("vp_sde", "edm", 40, "cfg"),
]


def draw_guided(g: Guided, n: int, seed0: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.diffusion.guidance import classifier_cond_fn, oracle_classifier

    view, _, alpha_sigma = oracle_view(g.objective, GM, g.options)
    y = labels(n, seed0 + 1)
    kw = {}
    if g.kind == "cfg":
        kw = {"guidance_scale": g.w, "null_class": K}  # (1 + w) eps(x, y) - w eps(x, null)
    else:
        net = view.net
        view = view.with_net(lambda x, t, y=None, **_: net(x, t, None))  # the unconditional oracle
        kw = {"cond_fn": classifier_cond_fn(oracle_classifier(Oracle(GM), alpha_sigma))}
    x = sample(view, g.sampler, (n, D), torch.arange(n) + seed0, steps=g.steps, y=y, options=g.sampler_options, **kw)
    return x.to(torch.float64), y


@pytest.mark.parametrize("g", GUIDED, ids=[g.id for g in GUIDED])
def test_guided_sampling_reproduces_each_class(g):
    """Guided samples with y ~ pi reproduce the mixture (19 statistics) and land in their class
    (mean p(y | x)), within 5 combined SE of truth + measured bias (false failure 1.2e-5, power
    0.71 against a 5% variance error). With the exact noisy classifier, guided DDIM is DDIM on the
    exact conditional eps (ADM Algorithm 2), so only its discretisation bias remains. CFG at w = -1
    is the unconditional oracle reached through the null label: exact, and its labels are then
    independent of the samples (agreement sum_k pi_k^2). CFG at w = +1 sharpens (the guided eps
    (1 + w) eps(x, y) - w eps(x) pushes away from the other classes at high noise): its measured
    bias (means moved by up to 1 component sd) is what it is checked around."""
    x, y = draw_guided(g, N_GUIDED, 0)
    check_mixture(x, g.bias, what=g.id, n_bias=N_BIAS_GUIDED)
    check_agreement(x, y, g.agree_bias, g.id, n_bias=N_BIAS_GUIDED, independent=g.w == -1.0)


def test_cfg_at_w_minus_one_is_the_unconditional_sampler_bit_for_bit():
    """(1 + w) eps(x, y) - w eps(x, null) at w = -1 is 0 eps(x, y) + 1 eps(x, null): the guided front
    door must return the unguided samples exactly (same seeds), whatever the labels."""
    view, _, _ = oracle_view("vp_sde")
    seeds = torch.arange(64)
    plain = sample(view, "edm", (64, D), seeds, steps=10)
    guided = sample(view, "edm", (64, D), seeds, steps=10, y=labels(64, 3), guidance_scale=-1.0, null_class=K)
    assert torch.equal(plain, guided)
    sharpened = sample(view, "edm", (64, D), seeds, steps=10, y=labels(64, 3), guidance_scale=1.0, null_class=K)
    assert not torch.equal(plain, sharpened)


def test_karras_levels_merged_by_snapping_are_reported():
    """Karras levels snapped to a discrete schedule's trained levels merge (EDM's round_sigma): 40 asked
    of the 1000-step cosine schedule give 22 steps. The sampler warns, registry.steps_used says how
    many (what metrics.json and samples.json record as steps_used; the sample function of
    evaluation.model_sampling: tests/test_objectives_integration.py); a continuous-time model takes
    the steps asked, silently."""
    import warnings

    view, _, _ = oracle_view("ddpm", GM, DDPM_OPTIONS)
    with pytest.warns(UserWarning, match="'edm': 40 Karras levels .* give 22 distinct steps"):
        sample(view, "edm", (4, D), range(4), steps=40)
    assert registry.steps_used("ddpm", registry.objective_options("ddpm", None, DDPM_OPTIONS), "edm", 40) == 22
    assert registry.steps_used("ddpm", registry.objective_options("ddpm", None, DDPM_OPTIONS), "ddim", 40) == 40
    sde_view, _, _ = oracle_view("vp_sde")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(sde_view, "dpm_solver", (4, D), range(4), steps=40)
    assert registry.steps_used("vp_sde", registry.objective_options("vp_sde", {}), "dpm_solver", 40) == 40


def test_guidance_is_refused_where_the_registry_does_not_allow_it():
    from pipeline.diffusion.guidance import classifier_cond_fn, oracle_classifier

    view, _, alpha_sigma = oracle_view("vp_sde")
    with pytest.raises(ValueError, match="classifier guidance is not allowed"):
        sample(view, "edm", (4, 2), range(4), steps=4, y=labels(4, 0),
               cond_fn=classifier_cond_fn(oracle_classifier(GM, alpha_sigma)))
    with pytest.raises(ValueError, match="null_class"):
        sample(view, "edm", (4, 2), range(4), steps=4, y=labels(4, 0), guidance_scale=1.0)


# ---------------------------------------------------------------------------------------------
# Inpainting through the registry: a correlated Gaussian, the first coordinate known


G1 = GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.1, -0.2]]),
                     torch.tensor([[[0.04, 0.024], [0.024, 0.0225]]]))
Y0 = 0.3  # one standard deviation above the first coordinate's mean


def conditional() -> tuple[float, float]:
    """x_1 | x_0 = Y0 ~ N(m, v) (the Gaussian conditional)."""
    mu, s = G1.means[0], G1.covs[0]
    return float(mu[1] + s[1, 0] / s[0, 0] * (Y0 - mu[0])), float(s[1, 1] - s[1, 0] ** 2 / s[0, 0])


@dataclass(frozen=True)
class Inpaint:
    objective: str
    sampler: str
    steps: int
    options: dict = field(default_factory=dict)
    sampler_options: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"inpaint-{self.objective}-{self.sampler}{self.steps}"

    @property
    def bias(self) -> tuple[float, float]:
        """Measured (mean error / sqrt(v), var / v - 1)."""
        return INPAINT_BIAS[self.id]


INPAINTS = [
    Inpaint("ddpm", "ddpm", 100, DDPM_OPTIONS, {**NO_CLIP, "resample": 5}),
    Inpaint("ddpm", "ddim", 100, DDPM_OPTIONS, {**NO_CLIP, "eta": 1.0, "resample": 5}),
    Inpaint("vp_sde", "pc", 250, {}, PREDICTOR_ONLY),
    Inpaint("ve_sde", "pc", 250, {}, PREDICTOR_ONLY),
    Inpaint("ncsn", "langevin", 30, NCSN_OPTIONS, {"langevin_step_lr": 6e-5}),
]


def draw_inpaint(p: Inpaint, n: int, seed0: int) -> torch.Tensor:
    view, _, _ = oracle_view(p.objective, G1, p.options)
    known = torch.tensor([[Y0, 0.0]]).expand(n, 2)
    return sample(view, p.sampler, (n, D), torch.arange(n) + seed0, steps=p.steps, options=p.sampler_options,
                  known=known, mask=torch.tensor([[True, False]])).to(torch.float64)


def inpaint_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate - truth, SE) of E[(x_1 - m) / sqrt(v)] = 0 and E[(x_1 - m)^2 / v] = 1."""
    m, v = conditional()
    u = (x[:, 1] - m) / math.sqrt(v)
    f = torch.stack([u, u**2], 1)
    return f.mean(0) - torch.tensor([0.0, 1.0], dtype=torch.float64), f.std(0) / math.sqrt(len(f))


@pytest.mark.parametrize("p", INPAINTS, ids=[p.id for p in INPAINTS])
def test_inpainting_through_the_registry_follows_the_gaussian_conditional(p):
    """Known coordinate kept exactly; the unknown one's standardised mean and variance within 5
    combined SE of the conditional N(m, v) + the measured bias of replacement inpainting (false
    failure 1.1e-6; SE(var / v) = 0.0105, so a 5% variance error is 4.8 SE: power 0.41; the pair
    checks above carry the variance power). Replacement inpainting is approximate: with RePaint
    resampling (5 rounds, 100 steps) it under-disperses the unknown coordinate by ~35%; PC without
    the corrector misses the mean by ~0.4 sd; annealed Langevin is within ~10%."""
    x = draw_inpaint(p, N_INPAINT, 0)
    assert (x[:, 0] == torch.tensor(Y0, dtype=torch.float32).double()).all(), p.id
    err, se = inpaint_statistics(x)
    bound = Z * se * math.sqrt(1 + N_INPAINT / N_BIAS_INPAINT)
    assert ((err - torch.tensor(p.bias, dtype=torch.float64)).abs() <= bound).all(), (p.id, err, p.bias, bound)


def test_inpainting_is_refused_where_a_sampler_would_ignore_it():
    """Regression: DDIM on an SDE model and ancestral sampling of a VDM model silently dropped
    known/mask (returned unconstrained samples); the registry now refuses them."""
    known, mask = torch.zeros(4, 2), torch.tensor([[True, False]])
    for objective, sampler, options in (("vp_sde", "ddim", {}), ("vdm", "ddpm", VDM_OPTIONS), ("ddpm", "edm", DDPM_OPTIONS)):
        view, _, _ = oracle_view(objective, GM, options)
        with pytest.raises(ValueError, match="known/mask"):
            sample(view, sampler, (4, 2), range(4), steps=4, known=known, mask=mask)
        with pytest.raises(ValueError, match="cannot inpaint"):
            registry.check_sampler_fits(objective, sampler, inpainting=True)


# ---------------------------------------------------------------------------------------------
# The PC sampler's Langevin corrector


def pc_batch_norms(n: int, seed0: int, corrector=None) -> torch.Tensor:
    """PC (reverse diffusion + 1 Langevin step, snr 0.16, 250 steps) with batch-averaged norms."""
    from pipeline.diffusion import noise_from_seeds
    from pipeline.diffusion.sde import pc_sample

    view, _, _ = oracle_view("vp_sde")
    seeds = torch.arange(n) + seed0
    x = pc_sample(view.score_fn(None), view.sde, noise_from_seeds(seeds, (D,), 0), steps=250, snr=0.16,
                  corrector_steps=1, snr_norm="batch", eps=view.t_eps, seeds=seeds)
    return x.to(torch.float64)




def test_pc_langevin_corrector_with_batch_norms_reproduces_the_mixture():
    """The corrector's math (Algorithm 5, batch-averaged norms as in the reference code) on the
    registry's VP view: 19 statistics within 5 combined SE of truth + measured bias (false failure
    1.1e-5; power 0.71 against a 5% variance error)."""
    check_mixture(pc_batch_norms(N_GUIDED, 0), BIAS["pc-batch"], what="pc-batch", n_bias=N_BIAS_GUIDED)


def pc_registry(n: int, seed0: int, objective: str = "vp_sde") -> torch.Tensor:
    """PC as users call it: registry.sample(..., 'pc', steps=250) with its default corrector (1 Langevin
    step, snr 0.16, step 2 alpha (snr sigma_t)^2)."""
    view, _, _ = oracle_view(objective)
    return sample(view, "pc", (n, D), torch.arange(n) + seed0, steps=250).to(torch.float64)


@pytest.mark.parametrize("objective", ["vp_sde", "ve_sde"])
def test_pc_with_the_corrector_through_the_registry_reproduces_the_mixture(objective):
    """Regression: run_pc's per-example corrector norms over-dispersed this mixture ~5x in variance (a
    near-zero ||score|| of one 2-D example exploded its step); the noise-level step of
    sde.langevin_corrector fixes it. 19 statistics within 5 combined SE of truth + the measured bias
    (var +0.046 VP, +0.021 VE at N = 1e5; false failure 1.1e-5; power 0.71 against a 5% variance
    error). The old rule ('example' norms) fails it: test_the_per_example_corrector_norms_fail."""
    name = "pc-registry" if objective == "vp_sde" else f"pc-registry-{objective}"
    check_mixture(pc_registry(N_GUIDED, 0, objective), BIAS[name], what=name, n_bias=N_BIAS_GUIDED)


def test_the_per_example_corrector_norms_fail(monkeypatch):
    """The broken variant of the check above: the corrector with each example's own norms (the rule
    run_pc used before) over-disperses (measured at N = 2000: 'var' +5.3, i.e. 6.3x the variance, but
    heavy-tailed, so only 3.5 SE; the weights 'w0' / 'w2' 8 SE and 'S211' 9 SE carry the failure)."""
    from pipeline.diffusion import sde as sde_module

    right = sde_module.langevin_corrector
    monkeypatch.setattr(sde_module, "langevin_corrector", lambda *a, **k: right(*a, **{**k, "norm": "example"}))
    with pytest.raises(AssertionError, match="pc-example-norms"):
        check_mixture(pc_registry(2000, 0), BIAS["pc-registry"], what="pc-example-norms", n_bias=N_BIAS_GUIDED)


# ---------------------------------------------------------------------------------------------
# Each check fails on a deliberately broken variant


def inflate(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each sample's deviation from its most probable component's mean: variance x factor."""
    k = Oracle(GM).posterior(x).argmax(1)
    return GM.means[k] + math.sqrt(factor) * (x - GM.means[k])


def test_exact_samples_pass_and_a_5_percent_variance_error_fails():
    """Exact mixture samples pass (bias 0; false failure 1.1e-5); the same samples with every
    component's variance 5% too large (or small) fail on 'var': the shift 0.043 is 19 SE at N = 2e5,
    so the broken variant passes with probability < 1e-20. (The N = 3000 covariance band of
    test_samplers_oracle.assert_reproduces_mixture sees it as < 1 SE per entry.)"""
    x, _ = GM.sample(200_000, torch.Generator().manual_seed(7))
    check_mixture(x, n_bias=10**12)
    with pytest.raises(AssertionError, match=r"var: err \+0\.0"):
        check_mixture(inflate(x, 1.05), n_bias=10**12)
    with pytest.raises(AssertionError, match=r"var: err -0\.0"):
        check_mixture(inflate(x, 0.95), n_bias=10**12)


def test_a_wrong_corrector_step_size_fails(monkeypatch):
    """Langevin corrector whose drift uses twice the step its noise was drawn for (x + 2 eps s +
    sqrt(2 eps) z): its stationary law is too narrow, and the registry PC check fails (measured: 'var'
    36 SE low, 'w0' / 'w2' 15 SE, 8 other statistics > 5 SE)."""
    from pipeline.diffusion import sde as sde_module

    right = sde_module.langevin_corrector

    def wrong(score_fn, sde, x, t, dt, noise, **kw):
        x_new, x_mean = right(score_fn, sde, x, t, dt, noise, **kw)
        return x_new + (x_mean - x), x_mean + (x_mean - x)  # the drift step counted twice

    monkeypatch.setattr(sde_module, "langevin_corrector", wrong)
    with pytest.raises(AssertionError, match="pc-broken"):
        check_mixture(pc_registry(N_GUIDED, 0), BIAS["pc-registry"], what="pc-broken", n_bias=N_BIAS_GUIDED)


def test_a_wrong_stopping_time_fails():
    """The SDE samplers stop at t_eps = 1e-3 (the view's glue); stopping at 0.02 leaves noise of
    sd sigma(0.02) ~ 0.07 in every sample, and the Heun pair's check fails (measured: 'var' 72 SE high)."""
    import dataclasses

    pair = next(p for p in PAIRS if p.id == "vp_sde-heun100")
    view, _, _ = oracle_view("vp_sde")
    x = sample(dataclasses.replace(view, t_eps=0.02), "heun", (N_TEST, D), torch.arange(N_TEST), steps=100)
    with pytest.raises(AssertionError, match="var"):
        check_mixture(x.to(torch.float64), pair.bias, what="vp_sde-heun-t_eps")


# ---------------------------------------------------------------------------------------------
# Loss weightings by value: the oracle with a deliberate error eps^ = E[eps | x_t] + DELTA on the
# Gaussian G1, where E||eps - eps^||^2 = tr(I - sigma^2 C^-1) + |DELTA|^2, C = alpha^2 Sigma + sigma^2 I.
# The Monte-Carlo mean of the objective's own per-example loss (M examples, one call) must match the
# closed form / high-precision quadrature within 5 SE (false failure 5.7e-7 each).

DELTA = torch.tensor([0.3, -0.2], dtype=torch.float64)
M, M_VDM = 1_000_000, 50_000  # VDM's reconstruction term (256 bins per dimension) is the costly one
M_VDM_T = 20_000  # the T-step checks (their broken variant is a factor ~2.8 off)


def mmse(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """tr Cov(eps | x_t) = sum_i alpha^2 lam_i / (alpha^2 lam_i + sigma^2) for Gaussian data (eigenvalues lam)."""
    lam = torch.linalg.eigvalsh(G1.covs[0])
    a2, s2 = alpha.to(torch.float64)[..., None] ** 2, sigma.to(torch.float64)[..., None] ** 2
    return (a2 * lam / (a2 * lam + s2)).sum(-1)


def expected_error(alpha, sigma) -> torch.Tensor:
    return mmse(alpha, sigma) + (DELTA**2).sum()


def uniform_t_mean(f, lo: float, hi: float = 1.0, points: int = 400_001) -> float:
    """(1 / (hi - lo)) int_lo^hi f(t) dt by the trapezoid rule in u = log t (f varies like 1/t near 0)."""
    u = torch.linspace(math.log(lo), math.log(hi), points, dtype=torch.float64)
    t = u.exp()
    return float(torch.trapezoid(f(t) * t, u)) / (hi - lo)


def loss_mc(objective: str, options: dict, *, seed: int = 0, vdm_term: str | None = None,
            m: int | None = None) -> tuple[float, float]:
    """(mean, SE) of the objective's per-example loss for the deliberately wrong oracle on G1 (m examples)."""
    _, module, alpha_sigma = oracle_view(objective, G1, options)
    net = Oracle(G1).eps_net(alpha_sigma, offset=DELTA)
    m = m or (M_VDM if objective == "vdm" else M)
    x0, _ = G1.sample(m, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if vdm_term:
            from pipeline.diffusion.objectives import FloatOutput

            loss = getattr(module.terms(FloatOutput(net), x0, generator=gen), vdm_term)
        else:
            loss = module.training_loss(net, x0, generator=gen).loss
    loss = loss.to(torch.float64)
    return float(loss.mean()), float(loss.std()) / math.sqrt(m)


def check_loss(value: tuple[float, float], expected: float, what: str) -> None:
    mean, se = value
    assert abs(mean - expected) <= Z * se, f"{what}: Monte-Carlo {mean:.5f} +- {se:.5f}, closed form {expected:.5f}"


def sde_expected(objective: str, weighting: str, eps: float) -> float:
    """E_t~U(eps,1) lambda(t) E||eps - eps^||^2 / (D sigma^2 ... ): sigma2 -> 1, likelihood -> g^2 / sigma^2."""
    module = registry.build_objective(objective, {"weighting": weighting, "eps": eps})
    sde = module.sde

    def f(t):
        alpha, sigma = sde.marginal(t)
        lam = torch.ones_like(t) if weighting == "sigma2" else sde.coefficients(t)[1] ** 2 / sigma**2
        return lam * expected_error(alpha, sigma) / D  # reduce_mean: the mean over dimensions

    return uniform_t_mean(f, eps)


@pytest.mark.parametrize("objective", ["vp_sde", "subvp_sde", "ve_sde"])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_sde_loss_weighting_by_value(objective, weighting):
    """DSM with lambda = sigma^2 (E = mean_t of the error per dim) or the likelihood weighting
    lambda = g^2 (E = mean_t g^2 / sigma^2 of it), t ~ U(1e-3, 1). Relative SE at M = 1e6: 0.2%
    (sigma2, VE likelihood), 0.85% / 0.72% (VP / sub-VP likelihood, heavy-tailed near t = eps), so a
    weighting off by 5% is >= 5.9 SE (power >= 0.8; >= 0.999 except VP / sub-VP likelihood); swapping
    the two weightings (ratio 17 to 84) fails outright (test_a_swapped_sde_weighting_fails)."""
    options = {"weighting": weighting, "eps": 1e-3}
    check_loss(loss_mc(objective, options), sde_expected(objective, weighting, 1e-3), f"{objective}/{weighting}")


def test_a_swapped_sde_weighting_fails():
    got = loss_mc("vp_sde", {"weighting": "likelihood", "eps": 1e-3})
    with pytest.raises(AssertionError, match="closed form"):
        check_loss(got, sde_expected("vp_sde", "sigma2", 1e-3), "vp_sde swapped")
    got = loss_mc("vp_sde", {"weighting": "sigma2", "eps": 1e-3})
    with pytest.raises(AssertionError, match="closed form"):
        check_loss(got, sde_expected("vp_sde", "likelihood", 1e-3), "vp_sde swapped")


def ncsn_expected(options: dict) -> float:
    """1/2 mean over the levels of E||sigma s + z||^2 (summed over dims; alpha = 1): NCSN eq. 6 with lambda = sigma^2."""
    from pipeline.diffusion.ncsn import ncsn_sigmas

    sigmas = ncsn_sigmas(options["sigma_max"], options["sigma_min"], options["num_scales"])
    return 0.5 * float(expected_error(torch.ones_like(sigmas), sigmas).mean())


def test_ncsn_loss_by_value():
    """Relative SE 0.13% at M = 1e6: a missing 1/2 (test_a_missing_factor_in_the_ncsn_loss_fails) or a
    lambda of sigma instead of sigma^2 is hundreds of SE off."""
    check_loss(loss_mc("ncsn", NCSN_OPTIONS), ncsn_expected(NCSN_OPTIONS), "ncsn")


def test_a_missing_factor_in_the_ncsn_loss_fails(monkeypatch):
    from pipeline.diffusion import ncsn

    right = ncsn.ncsn_loss
    monkeypatch.setattr(ncsn, "ncsn_loss", lambda *a, **k: 2 * right(*a, **k))  # the 1/2 of eq. 6 dropped
    with pytest.raises(AssertionError, match="closed form"):
        check_loss(loss_mc("ncsn", NCSN_OPTIONS), ncsn_expected(NCSN_OPTIONS), "ncsn without 1/2")


def test_ddpm_simple_loss_by_value():
    """L_simple (DDPM eq. 14, eps target): mean over t in 0..T-1 of E||eps - eps^||^2 / D, exactly
    (a sum over the 1000 steps of the closed form); relative SE 0.19% at M = 1e6."""
    _, module, _ = oracle_view("ddpm", G1, DDPM_OPTIONS)
    abar = module.schedule.alphas_cumprod
    expected = float(expected_error(abar.sqrt(), (1 - abar).sqrt()).mean()) / D
    check_loss(loss_mc("ddpm", DDPM_OPTIONS), expected, "ddpm simple")


def ddpm_vlb_check(variance: str, assumed: str) -> None:
    """L_vlb = T L_{t-1} (t > 0): E[T KL(q(x_{t-1} | x_t, x0) || p) | t] per dim, in bits, is
    T / (2 ln 2) (log v_p / v_q + v_q / v_p - 1 + coef1^2 (sigma^2 / alpha^2) E||eps - eps^||^2 / (D v_p)),
    v_q = beta~_t and v_p = beta~_t (fixed_small) or beta_t (fixed_large) (DDPM eqs. 5-7). Compared
    example by example at its own t (the decoder term t = 0 is left out)."""
    options = {**DDPM_OPTIONS, "variance": variance, "loss": "vlb"}
    _, module, alpha_sigma = oracle_view("ddpm", G1, options)
    x0, _ = G1.sample(M, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = module.training_loss(Oracle(G1).eps_net(alpha_sigma, offset=DELTA), x0,
                                   generator=torch.Generator().manual_seed(6))
    sched, t = module.schedule, out.t_index
    keep = t > 0
    abar, beta, v_q, c1 = (v.to(torch.float64)[t] for v in (sched.alphas_cumprod, sched.betas,
                                                             sched.posterior_variance, sched.posterior_mean_coef1))
    v_p = v_q if assumed == "fixed_small" else beta
    mean_sq = c1**2 * (1 - abar) / abar * expected_error(abar.sqrt(), (1 - abar).sqrt()) / D
    kl = 0.5 * (torch.log(v_p / v_q) + v_q / v_p - 1 + mean_sq / v_p) / math.log(2.0)
    diff = (out.loss.to(torch.float64) - sched.num_timesteps * kl)[keep]
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) <= Z * se, (f"ddpm vlb {variance}: Monte-Carlo minus closed form {float(diff.mean()):.5f} "
                                               f"+- {se:.5f} (mean loss {float(out.loss[keep].mean()):.4f})")


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_vlb_loss_by_value(variance):
    """L_vlb's KL terms against the closed form at each example's t (false failure 5.7e-7). The
    difference has SE 0.024 bits on a mean loss of 53 bits (0.05%): a weighting off by 0.5% fails,
    and assuming the other variance is 26 SE off (test_a_ddpm_vlb_with_the_other_variance_fails)."""
    ddpm_vlb_check(variance, variance)


def test_a_ddpm_vlb_with_the_other_variance_fails():
    with pytest.raises(AssertionError, match="closed form"):
        ddpm_vlb_check("fixed_large", "fixed_small")


V_OUT = 0.4  # the learned-range output v: log variance = 0.7 log beta + 0.3 log beta~ (Improved DDPM eq. 15)


def learned_range_net(alpha_sigma, v: float = V_OUT):
    """The deliberately wrong oracle (eps + DELTA) with learned_range's extra channels fixed at v."""
    base = Oracle(G1).eps_net(alpha_sigma, offset=DELTA)
    return lambda x, t, y=None, **_: torch.cat([base(x, t, y), torch.full_like(x, v)], 1)


@functools.lru_cache(maxsize=None)
def _learned_range_draw(loss: str):
    options = {**DDPM_OPTIONS, "variance": "learned_range", "loss": loss}
    _, module, alpha_sigma = oracle_view("ddpm", G1, options)
    x0, _ = G1.sample(M // 4, torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = module.training_loss(learned_range_net(alpha_sigma), x0, generator=torch.Generator().manual_seed(9))
    sched, t = module.schedule, out.t_index
    keep = t > 0
    abar, beta, v_q, c1 = (v.to(torch.float64)[t] for v in (sched.alphas_cumprod, sched.betas,
                                                             sched.posterior_variance, sched.posterior_mean_coef1))
    frac = (V_OUT + 1) / 2
    v_p = torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(v_q))
    err = expected_error(abar.sqrt(), (1 - abar).sqrt()) / D
    kl = 0.5 * (torch.log(v_p / v_q) + v_q / v_p - 1 + c1**2 * (1 - abar) / abar * err / v_p) / math.log(2.0)
    weight = sched.num_timesteps * (module.vlb_weight if loss == "hybrid" else 1.0)
    return out, keep, err, kl, weight


def ddpm_learned_range_check(loss: str, vlb_scales: tuple[float, ...] = (1.0,)) -> None:
    """Per example at its own t > 0: E[loss | t] = E[L_simple | t] + lambda T E[L_{t-1} | t] (hybrid, lambda =
    vlb_weight) or T E[L_{t-1} | t] (vlb), where E[L_simple | t] = E||eps - eps^||^2 / D and L_{t-1} is
    the KL of ddpm_vlb_check with v_p = beta^0.7 beta~^0.3. Each of ``vlb_scales`` multiplies the closed
    form's KL term (1: the check; others: broken variants; one Monte-Carlo draw, cached, for all)."""
    out, keep, err, kl, weight = _learned_range_draw(loss)
    for scale in vlb_scales:
        expected = (err if loss == "hybrid" else 0.0) + weight * kl * scale
        diff = (out.loss.to(torch.float64) - expected)[keep]
        se = float(diff.std()) / math.sqrt(len(diff))
        assert abs(float(diff.mean())) <= Z * se, (f"ddpm {loss} learned_range (x{scale:g}): Monte-Carlo minus "
                                                   f"closed form {float(diff.mean()):.5f} +- {se:.5f}")


@pytest.mark.parametrize("loss", ["hybrid", "vlb"])
def test_ddpm_learned_range_loss_by_value(loss):
    """L_vlb and L_hybrid = L_simple + 0.001 L_vlb (Improved DDPM sec. 3.1) with the learned-range variance,
    against the closed form at each example's t (false failure 5.7e-7 each; M = 2.5e5). Measured SE
    of the mean difference: 5.9e-4 on a mean hybrid loss of 0.242 (its 0.001 T L_vlb part 0.053), so a
    lambda T L_vlb term 10% off is 8.3 SE and a dropped one 91 SE (test_a_wrong_hybrid_weight_fails);
    0.047 bits on a mean L_vlb of 53.4 bits, so a 1% weighting error is 8 SE."""
    ddpm_learned_range_check(loss)


def test_a_wrong_hybrid_weight_fails():
    for scale in (0.9, 1.1, 0.0):  # lambda T L_vlb 10% off, or dropped
        with pytest.raises(AssertionError, match="closed form"):
            ddpm_learned_range_check("hybrid", (scale,))


@functools.lru_cache(maxsize=None)
def hybrid_gradients(loss: str, v: float = V_OUT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-example loss, d loss / d mean offset b, d loss / d v) of the learned-range oracle whose eps output
    is offset by b (zero) and whose variance channels are v, through the objective's training_loss."""
    options = {**DDPM_OPTIONS, "variance": "learned_range", "loss": loss}
    _, module, alpha_sigma = oracle_view("ddpm", G1, options)
    x0, _ = G1.sample(512, torch.Generator().manual_seed(10))
    base = Oracle(G1).eps_net(alpha_sigma, offset=DELTA)
    b = torch.zeros(512, D, dtype=torch.float64, requires_grad=True)
    vv = torch.full((512, D), v, dtype=torch.float64, requires_grad=True)
    out = module.training_loss(lambda x, t, y=None, **_: torch.cat([base(x, t, y) + b, vv], 1), x0,
                               generator=torch.Generator().manual_seed(11))
    gb, gv = torch.autograd.grad(out.loss.sum(), [b, vv])
    return out.loss.detach(), gb, gv


def check_hybrid_gradients(hybrid, simple, vlb, weight: float = 0.001) -> None:
    """L_hybrid = L_simple + lambda L_vlb by value, per example; its gradient reaches the mean only through
    L_simple (the stop-gradient of Improved DDPM sec. 3.1) and the variance only through lambda L_vlb."""
    (lh, gbh, gvh), (ls, gbs, gvs), (lv, gbv, gvv) = hybrid, simple, vlb
    torch.testing.assert_close(lh, ls + weight * lv, rtol=1e-5, atol=1e-7)
    assert not gvs.any() and gvv.abs().max() > 0 and gbv.abs().max() > 0
    torch.testing.assert_close(gbh, gbs, rtol=1e-5, atol=1e-9, msg="mean gradient is not L_simple's alone")
    torch.testing.assert_close(gvh, weight * gvv, rtol=1e-5, atol=1e-9, msg="variance gradient is not lambda L_vlb's")


def test_ddpm_hybrid_loss_stops_the_mean_gradient_of_its_vlb_term():
    """Same t and noise (same generator) for the three losses: exact identities per example, no Monte Carlo."""
    check_hybrid_gradients(hybrid_gradients("hybrid"), hybrid_gradients("simple"), hybrid_gradients("vlb"))


def test_a_hybrid_without_the_stop_gradient_fails():
    """The broken variant: L_simple + lambda L_vlb with the mean's gradient flowing through L_vlb."""
    simple, vlb = hybrid_gradients("simple"), hybrid_gradients("vlb")
    no_stop = (simple[0] + 0.001 * vlb[0], simple[1] + 0.001 * vlb[1], simple[2] + 0.001 * vlb[2])
    with pytest.raises(AssertionError, match="mean gradient"):
        check_hybrid_gradients(no_stop, simple, vlb)


def vdm_discrete_expected(module, timesteps: int) -> float:
    """L_T = T/2 E_i (SNR(s_i) / SNR(t_i) - 1) E||eps - eps^(z_{t_i})||^2 (VDM eq. 13; SNR(s) / SNR(t) =
    exp(gamma(t) - gamma(s))), i uniform on 1..T: exactly 1/2 sum_i expm1(gamma_i - gamma_{i-1}) error_i."""
    g = module._schedule(torch.arange(timesteps + 1, dtype=torch.float64) / timesteps, False)[0].detach()
    err = expected_error(torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt())
    return 0.5 * float((torch.expm1(g[1:] - g[:-1]) * err[1:]).sum())


@pytest.mark.parametrize("schedule", ["fixed_linear", "learned"])
def test_vdm_discrete_time_loss_by_value(schedule):
    """The T = 10 step diffusion loss against its exact sum (false failure 5.7e-7). Relative SE 1.1-1.2% at
    M = 2e4 (measured: 27.46 +- 0.30 vs 27.33 fixed_linear, 30.28 +- 0.36 vs 29.99 learned): the continuous-time weighting gamma_t - gamma_s in place of expm1 (a factor ~2.8 here), a
    dropped T or the SNR ratio inverted fail (test_a_vdm_discrete_loss_with_the_continuous_weight_fails)."""
    options = {**VDM_OPTIONS, "schedule": schedule, "timesteps": 10}
    _, module, _ = oracle_view("vdm", G1, options)
    check_loss(loss_mc("vdm", options, vdm_term="loss_diff", m=M_VDM_T), vdm_discrete_expected(module, 10),
               f"vdm T=10 {schedule}")


def test_a_vdm_discrete_loss_with_the_continuous_weight_fails(monkeypatch):
    from pipeline.diffusion import vdm

    right = vdm.vdm_discrete_diffusion_loss

    def continuous_weight(eps_fn, x, g_t, g_s, timesteps, **k):  # T/2 (gamma_t - gamma_s) instead of expm1
        return right(eps_fn, x, g_t, g_s, timesteps, **k) * (g_t - g_s) / torch.expm1(g_t - g_s)

    monkeypatch.setattr(vdm, "vdm_discrete_diffusion_loss", continuous_weight)
    options = {**VDM_OPTIONS, "timesteps": 10}
    _, module, _ = oracle_view("vdm", G1, options)
    with pytest.raises(AssertionError, match="closed form"):
        check_loss(loss_mc("vdm", options, vdm_term="loss_diff", m=M_VDM_T), vdm_discrete_expected(module, 10),
                   "vdm T=10")


@pytest.mark.parametrize("schedule", ["fixed_linear", "learned"])
def test_vdm_diffusion_loss_by_value(schedule):
    """L_inf = 1/2 E_t gamma'(t) E||eps - eps^||^2 = 1/2 int_{gamma_0}^{gamma_1} (error at gamma) d gamma:
    it depends on the schedule's endpoints only (VDM sec. 5.1), so the learned schedule's random
    interior must give the same value; the prior term is E KL = 1/2 sum(sigma_1^2 + alpha_1^2 E x^2 - 1 -
    log sigma_1^2). Relative SE 0.7% at M = 5e4: a 5% error in the weighting is 7 SE (power 0.98);
    dropping gamma' fails (test_a_vdm_loss_without_gamma_prime_fails)."""
    options = {**VDM_OPTIONS, "schedule": schedule}
    _, module, _ = oracle_view("vdm", G1, options)
    g0, g1 = (float(v) for v in module._schedule(torch.tensor([0.0, 1.0], dtype=torch.float64), False)[0].detach())
    gamma = torch.linspace(g0, g1, 200_001, dtype=torch.float64)
    err = expected_error(torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt())
    check_loss(loss_mc("vdm", options, vdm_term="loss_diff"), 0.5 * float(torch.trapezoid(err, gamma)), f"vdm {schedule}")
    a2, s2 = torch.sigmoid(torch.tensor(-g1)), torch.sigmoid(torch.tensor(g1))
    ex2 = torch.diagonal(G1.covs[0]) + G1.means[0] ** 2
    klz = 0.5 * float((s2 + a2 * ex2 - 1 - torch.log(s2)).sum())
    check_loss(loss_mc("vdm", options, vdm_term="loss_klz"), klz, f"vdm {schedule} prior")


def test_a_vdm_loss_without_gamma_prime_fails(monkeypatch):
    from pipeline.diffusion import vdm

    right = vdm.vdm_continuous_diffusion_loss
    monkeypatch.setattr(vdm, "vdm_continuous_diffusion_loss",
                        lambda eps_fn, x, g, dg, **k: right(eps_fn, x, g, torch.ones_like(dg), **k))
    _, module, _ = oracle_view("vdm", G1, VDM_OPTIONS)
    g0, g1 = (float(v) for v in module._schedule(torch.tensor([0.0, 1.0], dtype=torch.float64), False)[0].detach())
    gamma = torch.linspace(g0, g1, 200_001, dtype=torch.float64)
    err = expected_error(torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt())
    with pytest.raises(AssertionError, match="closed form"):
        check_loss(loss_mc("vdm", VDM_OPTIONS, vdm_term="loss_diff"), 0.5 * float(torch.trapezoid(err, gamma)), "vdm")


# ---------------------------------------------------------------------------------------------
# The measured biases (python tests/test_oracle_front_door.py measure N ids...): statistic -> bias at
# the steps used; statistics within 2 SE of 0 at the measuring N are not listed (0).

BIAS: dict[str, dict[str, float]] = {
    'classifier-ddpm-ddim100': {'m01': 0.0094, 'S000': -0.0825, 'S011': -0.1574, 'S001': 0.018, 'S100': -0.1282, 'S111': -0.1214, 'S101': -0.0301, 'S200': -0.0936, 'S211': -0.1463, 'var': -0.1214},
    'classifier-ddpm-ddpm250': {'m00': 0.0152, 'm10': -0.0168, 'm21': -0.0176, 'S000': -0.0653, 'S011': -0.1485, 'S001': 0.0225, 'S100': -0.1104, 'S111': -0.1018, 'S101': -0.021, 'S200': -0.0897, 'S211': -0.134, 'var': -0.1076},
    'cfg-1-ddpm-ddim100': {'m00': 0.0346, 'm01': 0.0128, 'm10': -0.0334, 'm11': 0.0137, 'm21': -0.0379, 'S000': -0.0396, 'S011': -0.1308, 'S001': 0.0206, 'S100': -0.0471, 'S111': -0.0773, 'S101': -0.0305, 'S200': -0.088, 'S211': -0.0927, 'S201': 0.0167, 'var': -0.0793},
    'cfg-1-vp_sde-edm40': {'m00': -0.0113, 'm10': 0.0307, 'm21': 0.0367, 'S100': 0.0318, 'var': 0.0153},
    'cfg-1-vdm-ddpm250': {'w0': 0.0035, 'w2': -0.0027, 'm00': 0.0368, 'm01': 0.0108, 'm10': -0.0316, 'm21': -0.0152, 'S000': -0.0295, 'S011': -0.0251, 'S100': -0.0437, 'S111': -0.0396, 'S200': -0.0617, 'S211': -0.0477, 'var': -0.0371},
    'cfg+1-ddpm-ddim100': {'m00': -0.5834, 'm01': -0.1466, 'm10': 0.8162, 'm11': -0.0772, 'm20': 0.075, 'm21': 0.959, 'S000': -0.1531, 'S011': -0.3378, 'S001': 0.0532, 'S100': 0.1017, 'S111': -0.392, 'S101': -0.0927, 'S200': -0.3842, 'S211': 0.3214, 'S201': 0.0538, 'var': -0.1726},
    'cfg+1-vp_sde-edm40': {'m00': -0.5921, 'm01': -0.1488, 'm10': 0.8414, 'm11': -0.0711, 'm20': 0.0774, 'm21': 1.0052, 'S000': -0.0598, 'S011': -0.1916, 'S001': 0.0386, 'S100': 0.2382, 'S111': -0.2853, 'S101': -0.0807, 'S200': -0.2822, 'S211': 0.5227, 'S201': 0.0569, 'var': -0.0458},
    'ddpm-ddpm250': {'w0': 0.0039, 'm00': 0.0162, 'm10': -0.0138, 'S000': -0.0673, 'S011': -0.1425, 'S001': 0.0268, 'S100': -0.1135, 'S111': -0.1087, 'S101': -0.0255, 'S200': -0.0908, 'S211': -0.1479, 'var': -0.1096},
    'ddpm-ddim100': {'m00': 0.0346, 'm01': 0.0128, 'm10': -0.0334, 'm11': 0.0137, 'm21': -0.0379, 'S000': -0.0396, 'S011': -0.1308, 'S001': 0.0206, 'S100': -0.0471, 'S111': -0.0773, 'S101': -0.0305, 'S200': -0.088, 'S211': -0.0927, 'S201': 0.0167, 'var': -0.0793},
    'ddpm-edm100': {'m00': -0.0097, 'm10': 0.027, 'm21': 0.0308, 'S011': 0.0195, 'S100': 0.0344, 'S201': 0.0146, 'var': 0.0198},
    'ddpm-dpm_solver100': {'m10': 0.0269, 'm21': 0.0365, 'S000': 0.0475, 'S011': 0.0318, 'S100': 0.0591, 'S111': 0.037, 'S101': -0.0142, 'S211': 0.0386, 'S201': 0.0195, 'var': 0.0395},
    'ddpm-euler256': {'w0': 0.0039, 'w2': -0.0034, 'm00': 0.0703, 'm01': 0.0228, 'm10': -0.076, 'm11': 0.0168, 'm21': -0.0909, 'S000': 0.0301, 'S011': -0.0167, 'S001': 0.0111, 'S100': 0.0401, 'S200': -0.0411, 'S211': 0.0266, 'S201': 0.0149},
    'vp_sde-pc250': {'m00': 0.0128, 'm11': 0.0126, 'S000': 0.0594, 'S011': 0.0516, 'S100': 0.0865, 'S111': 0.0713, 'S200': 0.0815, 'S211': 0.0982, 'var': 0.0694},
    'vp_sde-ode1': {'S100': 0.0236, 'var': 0.009},
    'vp_sde-heun100': {'S000': 0.0148, 'S011': 0.0559, 'S001': -0.0162, 'S100': 0.0538, 'S111': 0.0304, 'S211': 0.0601, 'var': 0.0379},
    'vp_sde-ddim200': {'m00': 0.0327, 'm01': 0.012, 'm10': -0.0325, 'm11': 0.0122, 'm21': -0.036, 'S000': -0.039, 'S011': -0.1313, 'S001': 0.0218, 'S100': -0.0467, 'S111': -0.0784, 'S101': -0.0291, 'S200': -0.0914, 'S211': -0.0991, 'S201': 0.0159, 'var': -0.0804},
    'vp_sde-edm40': {'m00': -0.0113, 'm10': 0.0307, 'm21': 0.0367, 'S100': 0.0318, 'var': 0.0153},
    'vp_sde-dpm_solver40': {'m10': 0.0315, 'm21': 0.0447, 'S000': 0.0447, 'S011': 0.0191, 'S100': 0.0572, 'S111': 0.0331, 'S101': -0.0176, 'S211': 0.0282, 'S201': 0.0177, 'var': 0.0334},
    'vp_sde-euler256': {'m00': 0.0321, 'm01': 0.0125, 'm10': -0.0314, 'm21': -0.0365, 'S011': -0.0251, 'S100': 0.0199, 'S200': -0.0286, 'S201': 0.018, 'var': -0.0079},
    'subvp_sde-pc250': {'S001': 0.012, 'S100': 0.0298, 'var': 0.0129},
    'subvp_sde-ode1': {},
    'subvp_sde-heun100': {'S100': 0.0229},
    'subvp_sde-ddim200': {'m00': 0.035, 'm01': 0.0128, 'm10': -0.0339, 'm11': 0.0121, 'm21': -0.0398, 'S011': -0.0345, 'S111': -0.0196, 'S200': -0.0391, 'S201': 0.0182, 'var': -0.0137},
    'subvp_sde-edm40': {'m00': -0.0182, 'm10': 0.0425, 'm21': 0.0518, 'S000': 0.0263, 'S011': 0.0402, 'S100': 0.0516, 'S111': 0.034, 'S200': 0.0278, 'S211': 0.0422, 'var': 0.0365},
    'subvp_sde-dpm_solver40': {'m00': -0.0118, 'm10': 0.0499, 'm11': 0.0143, 'm21': 0.0684, 'S000': 0.0748, 'S011': 0.065, 'S100': 0.0848, 'S111': 0.0617, 'S101': -0.015, 'S200': 0.0339, 'S211': 0.0754, 'S201': 0.0191, 'var': 0.0679},
    'subvp_sde-euler256': {'m00': 0.0375, 'm01': 0.0136, 'm10': -0.0357, 'm11': 0.0122, 'm21': -0.0428, 'S100': 0.0277, 'S200': -0.0238, 'S201': 0.0187},
    've_sde-pc250': {'w0': -0.0065, 'w2': 0.0045, 'S011': 0.0497, 'S100': 0.0437, 'S111': 0.0606, 'S200': 0.059, 'S211': 0.0819, 'var': 0.0456},
    've_sde-ode1': {'S100': 0.0275, 'var': 0.0092},
    've_sde-heun100': {'m10': 0.0119, 'S011': 0.0267, 'S100': 0.0347, 'S211': 0.0351, 'var': 0.0203},
    've_sde-ddim200': {'m00': 0.0312, 'm01': 0.0128, 'm10': -0.0264, 'm11': 0.0121, 'm21': -0.033, 'S011': -0.0215, 'S201': 0.0158},
    've_sde-edm40': {'m10': 0.0198, 'm21': 0.0259, 'S100': 0.0256, 'var': 0.0067},
    've_sde-dpm_solver40': {'m10': 0.019, 'm21': 0.0255, 'S000': 0.0264, 'S100': 0.0449, 'S111': 0.0202, 'S101': -0.0139, 'S211': 0.0277, 'var': 0.0222},
    've_sde-euler256': {'m00': 0.0283, 'm01': 0.0119, 'm10': -0.0235, 'm11': 0.0118, 'm21': -0.0291, 'S011': -0.0255, 'S201': 0.0153, 'var': -0.0083},
    'ncsn-langevin30': {'w0': -0.0151, 'w1': 0.0067, 'w2': 0.0085, 'S000': 0.0317, 'S011': 0.0242, 'S100': 0.0908, 'S111': 0.0826, 'S200': 0.1163, 'S211': 0.1109, 'var': 0.0627},
    'vdm-ddpm250': {'w0': 0.0035, 'w2': -0.0027, 'm00': 0.0368, 'm01': 0.0108, 'm10': -0.0316, 'm21': -0.0152, 'S000': -0.0295, 'S011': -0.0251, 'S100': -0.0437, 'S111': -0.0396, 'S200': -0.0617, 'S211': -0.0477, 'var': -0.0371},
    'pc-registry': {'m00': 0.0123, 'S000': 0.0486, 'S011': 0.0433, 'S100': 0.0462, 'S111': 0.0324, 'S200': 0.0478, 'S211': 0.0669, 'var': 0.0462},
    'pc-registry-ve_sde': {'S011': 0.0173, 'S100': 0.0246, 'S111': 0.0286, 'S200': 0.0275, 'S211': 0.0384, 'var': 0.0213},
    'pc-batch': {'S000': 0.029, 'S011': 0.0161, 'S001': 0.0102, 'S200': 0.0409, 'S211': 0.0376, 'var': 0.024},
}
AGREE_BIAS: dict[str, float] = {
    'classifier-ddpm-ddim100': 0.0,
    'classifier-ddpm-ddpm250': -0.0001,
    'cfg-1-ddpm-ddim100': 0.001,
    'cfg-1-vp_sde-edm40': 0.0007,
    'cfg-1-vdm-ddpm250': 0.0014,
    'cfg+1-ddpm-ddim100': 0.0,
    'cfg+1-vp_sde-edm40': 0.0,
}
INPAINT_BIAS: dict[str, tuple[float, float]] = {
    'inpaint-ddpm-ddpm100': (-0.0882, -0.3489),
    'inpaint-ddpm-ddim100': (-0.088, -0.3492),
    'inpaint-vp_sde-pc250': (-0.4027, 0.5331),
    'inpaint-ve_sde-pc250': (-0.3829, 0.4693),
    'inpaint-ncsn-langevin30': (-0.0351, 0.0942),
}


# ---------------------------------------------------------------------------------------------
# Offline: measure each pair's bias once (python tests/test_oracle_front_door.py measure [N] [ids...])


def measure(n: int, ids: list[str]) -> None:
    def pick(items):
        return [i for i in items if not ids or i.id in ids]

    ref, _ = agreement_truth()
    for g in pick(GUIDED):
        t0 = time.time()
        x, y = draw_guided(g, n, 10_000_000)
        agree = Oracle(GM).posterior(x).gather(1, y[:, None]).squeeze(1)
        truth_g = float((GM.weights**2).sum()) if g.w == -1.0 else ref
        print(f"{g.id}: agree_bias={float(agree.mean()) - truth_g:+.4f} (se {float(agree.std()) / math.sqrt(n):.4f})", flush=True)
        _report(g.id, x, t0)
    for p in pick(INPAINTS):
        t0 = time.time()
        err, se = inpaint_statistics(draw_inpaint(p, n, 10_000_000))
        print(f"{p.id}: bias=({float(err[0]):+.4f}, {float(err[1]):+.4f}) se=({float(se[0]):.4f}, {float(se[1]):.4f}) "
              f"({time.time() - t0:.0f}s)", flush=True)
    if not ids or "pc-batch" in ids:
        t0 = time.time()
        _report("pc-batch", pc_batch_norms(n, 10_000_000), t0)
    for objective in ("vp_sde", "ve_sde"):
        name = "pc-registry" if objective == "vp_sde" else f"pc-registry-{objective}"
        if not ids or name in ids:
            t0 = time.time()
            _report(name, pc_registry(n, 10_000_000, objective), t0)
    for pair in pick(PAIRS):
        t0 = time.time()
        _report(pair.id, draw(pair, n, 10_000_000), t0)


def _report(name: str, x: torch.Tensor, t0: float) -> None:
    err, se = mixture_statistics(x)
    stated = {stat: round(e, 4) for stat, e, s in zip(STAT_NAMES, err.tolist(), se.tolist()) if abs(e) > 2 * s}
    print(f"{name}: bias={stated}  max|err|/se={float((err / se).abs().max()):.1f} "
          f"se_var={float(se[-1]):.4f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        measure(int(sys.argv[2]) if len(sys.argv) > 2 else N_BIAS, sys.argv[3:])
