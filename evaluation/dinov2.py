"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023), with weights from a local file.

FD-DINOv2 is the Frechet distance of the CLS token of DINOv2 ViT-L/14 (after its final norm, no
head), on images resized to 224 x 224 with bicubic interpolation and normalised with the
ImageNet mean and standard deviation, as in Stein et al.'s ``dgm-eval``.

The network is timm's ``vit_large_patch14_dinov2``, built with ``pretrained=False`` (no download)
and loaded from a local file (``eval.dinov2_weights``, else torch hub's cache
``<torch hub dir>/checkpoints/dinov2_vitl14_pretrain.pth``) in either published layout:

- timm's (``model.safetensors`` of ``timm/vit_large_patch14_dinov2.lvd142m``), or
- torch hub's (``dinov2_vitl14_pretrain.pth`` of facebookresearch/dinov2: has ``mask_token``),

read with safetensors or ``torch.load(weights_only=True)`` and converted by timm's own
``checkpoint_filter_fn`` (hub keys, position embeddings resampled from the 37 x 37 grid of 518
pixels to the 16 x 16 grid of 224 pixels, bicubic). The width, depth and MLP size are read from
the file (heads = width / 64, as in every DINOv2 ViT), so a file of another ViT-S/B/L size loads
too and its provenance says so; only ViT-L/14 gives numbers comparable with published FD-DINOv2.

Registered with torch-fidelity as :data:`DINOV2_EXTRACTOR` (one feature, ``"dinov2"``), so the
same sharded feature pass and reference cache serve it as serve the Inception features.
torch-fidelity's own ``dinov2-vit-l-14`` extractor loads only through torch hub (network) and
resizes bilinearly, which is why this one exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from evaluation.inception import ExtractorSource, MissingWeightsError, file_sha256

__all__ = ["DINOV2_EXTRACTOR", "DINOV2_FEATURE", "FeatureExtractorDinoV2Local", "build_dinov2",
           "load_dinov2_state_dict", "resolve_dinov2", "torch_hub_cache_path"]

DINOV2_EXTRACTOR = "dinov2-vit-l-14-local"
DINOV2_FEATURE = "dinov2"
TIMM_ARCH = "vit_large_patch14_dinov2"
INPUT_SIZE = 224
HEAD_DIM = 64  # every DINOv2 ViT (S/B/L/G) uses 64-dimensional attention heads
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_FILE = "dinov2_vitl14_pretrain.pth"
VIT_L14 = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 14}


def _how_to_provide(reason: str) -> str:
    return (
        f"no DINOv2 weights for FD-DINOv2 ({reason}). Provide ViT-L/14 weights as a local file and set "
        f"eval.dinov2_weights=PATH (launch/evaluate.py --dinov2-weights PATH), or put torch hub's file at "
        f"{torch_hub_cache_path()}; either layout loads:\n"
        f"  - timm's model.safetensors of timm/vit_large_patch14_dinov2.lvd142m (Hugging Face), or\n"
        f"  - torch hub's dinov2_vitl14_pretrain.pth "
        f"(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth)."
    )


def load_dinov2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a DINOv2 weights file: safetensors, or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: not a DINOv2 ViT state dict (no 'cls_token' / 'patch_embed.proj.weight')")
    return {k.removeprefix("backbone."): v for k, v in state.items()}


def architecture_of(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """ViT shape read from the tensors (DINOv2 uses 64-dimensional heads at every size)."""
    embed_dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else None
    if hidden is None:
        raise ValueError("DINOv2 weights: only the MLP ViTs (S/B/L) are supported, not the SwiGLU ViT-G")
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // HEAD_DIM,
            "patch_size": int(state["patch_embed.proj.weight"].shape[-1]), "mlp_hidden": hidden}


def build_dinov2(path: str | Path) -> torch.nn.Module:
    """timm's ``vit_large_patch14_dinov2`` at 224 pixels (CLS output, no head) with the file's weights."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_dinov2_state_dict(path)
    arch = architecture_of(state)
    model = timm.create_model(
        TIMM_ARCH, pretrained=False, img_size=INPUT_SIZE, num_classes=0,
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
        patch_size=arch["patch_size"], mlp_ratio=arch["mlp_hidden"] / arch["embed_dim"],
        reg_tokens=int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0,
        no_embed_class="register_tokens" in state,
    )
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return model.eval().requires_grad_(False)


class FeatureExtractorDinoV2Local(FeatureExtractorBase):
    """torch-fidelity feature extractor: DINOv2 CLS features of uint8 images, weights from a file."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise MissingWeightsError(_how_to_provide("no weights path given"))
        self.model = build_dinov2(feature_extractor_weights_path)
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"{self.name}: expected uint8 (B, 3, H, W) images, got {getattr(x, 'shape', x)}")
        x = F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 255)
        return (self.model((x - self.mean) / self.std).float(),)

    @staticmethod
    def get_provided_features_list():
        return (DINOV2_FEATURE,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return DINOV2_FEATURE

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)


if DINOV2_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DINOV2_EXTRACTOR, FeatureExtractorDinoV2Local)


def torch_hub_cache_path() -> Path:
    """Where ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")`` keeps the weights it downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILE


def resolve_dinov2(weights_path: str | Path | None) -> ExtractorSource:
    """The DINOv2 extractor of ``eval.dinov2_weights``, else torch hub's cached file;
    :class:`MissingWeightsError` when neither exists (nothing is downloaded)."""
    if weights_path is None:
        cached = torch_hub_cache_path()
        if cached.is_file():
            return ExtractorSource(DINOV2_EXTRACTOR, str(cached), "torch-hub-cache", file_sha256(cached), False)
        raise MissingWeightsError(_how_to_provide(f"eval.dinov2_weights is not set and {cached} does not exist"))
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(_how_to_provide(f"eval.dinov2_weights='{weights_path}' is not a file"))
    return ExtractorSource(DINOV2_EXTRACTOR, str(path.resolve()), "configured", file_sha256(path), False)


def is_vit_l14(weights_path: str | Path) -> bool:
    """Whether a file holds the ViT-L/14 shape that published FD-DINOv2 numbers use."""
    arch = architecture_of(load_dinov2_state_dict(weights_path))
    return all(arch[k] == v for k, v in VIT_L14.items())
