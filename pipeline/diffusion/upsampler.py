"""ADM-U super-resolution: the low-resolution conditioning, its augmentation, and the objective.

An upsampler is a DDPM-family model of the high-resolution image x conditioned on a
low-resolution version of the same image (Dhariwal & Nichol 2021, ADM-U; the network takes it
bilinearly upsampled and concatenated to x_t). In training the low-resolution input is made from
each image itself: an antialiased (area) downsampling, then a conditioning augmentation that
makes the second stage robust to the first stage's artefacts:

- Gaussian blur with a random sigma (DALL-E 2's first upsampler, Ramesh et al. 2022, App. C);
- Gaussian noise of a random level s, z = sqrt(1 - s^2) low_res + s eps, whose level is given
  to the network (Imagen's noise conditioning augmentation, Saharia et al. 2022, sec. 2.5; Ho et
  al. 2021, Cascaded Diffusion Models, sec. 3.2). The level reaches the network through its
  vector-conditioning input (``model.overrides.cond_embed_dim``) as a sinusoidal embedding.

Each image's augmentation comes from its own seed, drawn from the training generator, so it does
not depend on the other images of its batch. At sampling time the cascade gives the first stage's
samples as ``low_res`` with a fixed noise level (``sample_noise_level``, 0: none).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .objectives import DDPMObjective, ObjectiveLoss

__all__ = ["LowResConditioned", "UpsamplerObjective", "antialiased_downsample", "augment_low_res", "gaussian_blur",
           "level_embedding", "make_low_res", "noise_augment"]

_LEVEL_SCALE = 1000.0  # the level s in [0, 1) is embedded like a timestep s * 1000


def low_res_side(size: int | None, image_size: int) -> int:
    """The low-resolution side: ``size``, or a quarter of the image's (ADM-U's 64 -> 256) when None."""
    return max(1, image_size // 4) if size is None else int(size)


def antialiased_downsample(x: Tensor, size: int) -> Tensor:
    """Area (box-filter) downsampling to ``size`` x ``size``: each low-res pixel is the mean of the
    pixels it covers (guided-diffusion's super-resolution data, ``F.interpolate(mode="area")``)."""
    if x.shape[-1] % size or x.shape[-2] % size:
        raise ValueError(f"low_res_size: {size} is not allowed for {x.shape[-2]}x{x.shape[-1]} images; it must divide "
                         "the image size")
    return F.interpolate(x, size=(size, size), mode="area")


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image i of ``x`` (B, C, H, W) with an isotropic Gaussian of std ``sigma[i]`` pixels
    (separable kernel, reflect padding); sigma = 0 leaves the image unchanged."""
    b, c, h, w = x.shape
    sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(b)
    radius = max(1, math.ceil(3.0 * float(sigma.max()))) if float(sigma.max()) > 0 else 0
    if radius == 0:
        return x
    radius = min(radius, (min(h, w) - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    safe = sigma.clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets[None] == 0).float())  # delta for sigma = 0
    k = kernel.repeat_interleave(c, dim=0).to(x.dtype)  # (B*C, K): one kernel per image channel
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def noise_augment(x: Tensor, level: Tensor, noise: Tensor) -> Tensor:
    """z = sqrt(1 - s^2) x + s eps: a variance-preserving noising at level s in [0, 1) (Imagen sec. 2.5)."""
    s = level.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - s * s).sqrt() * x + s * noise


def level_embedding(level: Tensor, dim: int) -> Tensor:
    """The augmentation level as the network's vector conditioning (B,) -> (B, dim): the sinusoidal
    embedding of s * 1000 (Vaswani et al. 2017 sec. 3.5, [cos, sin] at frequencies 10000^(-i/half)),
    as Imagen embeds its augmentation level like a timestep."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=level.device) / half)
    args = level.float()[:, None] * _LEVEL_SCALE * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=1), (0, dim - 2 * half))


def augment_low_res(x0: Tensor, size: int | None, seeds: list[int], *, blur_sigma_max: float,
                    noise_level_max: float) -> tuple[Tensor, Tensor]:
    """``(low_res, level)``: downsample, blur with sigma_i ~ U(0, blur_sigma_max), noise at level
    s_i ~ U(0, noise_level_max); image i's draws come from ``seeds[i]`` alone."""
    low = antialiased_downsample(x0.float(), low_res_side(size, x0.shape[-1]))
    sigmas, levels, noises = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        u = torch.rand(2, generator=g, dtype=torch.float64)
        sigmas.append(float(u[0]) * blur_sigma_max)
        levels.append(float(u[1]) * noise_level_max)
        noises.append(torch.randn(low.shape[1:], generator=g))
    level = torch.tensor(levels, device=low.device, dtype=torch.float32)
    if blur_sigma_max > 0:
        low = gaussian_blur(low, torch.tensor(sigmas, device=low.device))
    if noise_level_max > 0:
        low = noise_augment(low, level, torch.stack(noises).to(low.device))
    return low.to(x0.dtype), level


def make_low_res(x0: Tensor, size: int | None, *, blur_sigma_max: float, noise_level_max: float,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """:func:`augment_low_res` with one seed per image drawn from the training ``generator``."""
    device = generator.device if generator is not None else x0.device
    seeds = torch.randint(0, 2**62, (x0.shape[0],), generator=generator, device=device).cpu().tolist()
    return augment_low_res(x0, size, seeds, blur_sigma_max=blur_sigma_max, noise_level_max=noise_level_max)


class LowResConditioned:
    """``net(x, t, y)`` with the low-resolution image (and its augmentation level) bound: what the
    objective and the samplers call. ``low_res`` None: a flat (zero) image at ``size`` (the training-
    time sample grid, which has no first stage). A batch that repeats x (classifier-free guidance's
    conditional + unconditional halves) repeats the bound image."""

    def __init__(self, net, size: int | None, low_res: Tensor | None = None, level: Tensor | float = 0.0):
        self.net, self.size, self.low_res, self.level = net, size, low_res, level

    @property
    def config(self) -> Any:
        return getattr(self.net, "config", None)

    def expected_size(self, image_size: int | None = None) -> int | None:
        """The low-res side this network takes (None: unknown until it sees an image)."""
        image_size = image_size or getattr(self.config, "image_size", None)
        if self.size is None and image_size is None:
            return None
        return low_res_side(self.size, int(image_size))

    def with_low_res(self, low_res: Tensor, level: Tensor | float = 0.0) -> LowResConditioned:
        size = self.expected_size()
        if low_res.ndim != 4 or (size is not None and tuple(low_res.shape[-2:]) != (size, size)):
            raise ValueError(f"low_res: expected (B, C, {size}, {size}) images (the upsampler's "
                             f"low_res_size), got {tuple(low_res.shape)}")
        return LowResConditioned(self.net, self.size, low_res, level)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        config = self.config
        channels = int(getattr(config, "low_res_channels", 0) or x.shape[1])
        low = self.low_res
        if low is None:
            side = self.expected_size(x.shape[-1])
            low = x.new_zeros(b, channels, side, side)
        if low.shape[0] != b:
            if b % low.shape[0]:
                raise ValueError(f"low_res: {low.shape[0]} images for a batch of {b}")
            low = low.repeat(b // low.shape[0], 1, 1, 1)
        level = torch.as_tensor(self.level, device=x.device, dtype=torch.float32)
        level = level.expand(low.shape[0] if level.ndim == 0 else level.shape[0])
        if level.shape[0] != b:
            level = level.repeat(b // level.shape[0])
        return low.to(device=x.device, dtype=x.dtype), level

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Any) -> Tensor:
        if self.low_res is None and getattr(self.config, "low_res_channels", None) == 0:
            return self.net(x, t, y, **kwargs)  # nothing bound, a network without the input: a plain model
        low, level = self._inputs(x)
        dim = int(getattr(self.config, "cond_embed_dim", 0) or 0)
        if dim:
            kwargs["emb"] = level_embedding(level, dim).to(x.dtype)
        elif bool((level > 0).any()):
            raise ValueError("noise_level_max / the sampling noise level: a noise-augmentation level needs a network "
                             "that takes it (model.overrides.cond_embed_dim > 0); set the level to 0 or give the "
                             "network a vector-conditioning input")
        return self.net(x, t, y, low_res=low, **kwargs)


class UpsamplerObjective(DDPMObjective):
    """The DDPM-family loss on x with the low-resolution conditioning made from x itself (ADM-U)."""

    def __init__(self, low_res_size: int, blur_sigma_max: float, noise_level_max: float, sample_noise_level: float,
                 **ddpm: Any):
        super().__init__(**ddpm)
        self.low_res_size, self.blur_sigma_max, self.noise_level_max = low_res_size, blur_sigma_max, noise_level_max
        self.sample_noise_level = sample_noise_level

    def bind(self, net, low_res: Tensor | None = None, level: Tensor | float | None = None) -> LowResConditioned:
        """``net`` with a low-resolution image bound (None: flat); ``level`` None: ``sample_noise_level``."""
        bound = LowResConditioned(net, self.low_res_size)
        if low_res is None:
            return bound
        return bound.with_low_res(low_res, self.sample_noise_level if level is None else level)

    def training_loss(self, net, x0: Tensor, y: Tensor | None = None, *, generator=None) -> ObjectiveLoss:
        if getattr(getattr(net, "config", None), "low_res_channels", None) == 0:
            raise ValueError("the super-resolution objective needs a network that takes the low-resolution image: "
                             "set model.overrides.low_res_channels (3 for RGB)")
        low, level = make_low_res(x0, self.low_res_size, blur_sigma_max=self.blur_sigma_max,
                                  noise_level_max=self.noise_level_max, generator=generator)
        return super().training_loss(LowResConditioned(net, self.low_res_size, low, level), x0, y,
                                     generator=generator)

    forward = training_loss
