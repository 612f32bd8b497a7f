"""Named networks at their published sizes: an explicit registry (no imports from strings).

Each preset cites where its settings come from.  "guided-diffusion flags" are the
MODEL_FLAGS / CLASSIFIER_FLAGS published with the ADM checkpoints in openai/guided-diffusion's
README, with the channel multipliers that its ``script_util.py`` picks per image size; the
"improved-diffusion flags" are openai/improved-diffusion's README for CIFAR-10.

guided-diffusion's ``use_new_attention_order`` only changes how the fused qkv projection is
split into heads (no parameters, no change in function class); this implementation always uses
one fixed layout, so the flag has no counterpart here.  ``use_fp16`` is a runtime choice
(autocast in the training step), not an architecture field.

Parameter counts (tests/test_model_sizes.py asserts the published ones within 0.5%):
  ddpm_cifar10       35.7M  (Ho et al. 2020, Sec. 4)
  adm_imagenet64    295.9M  (class-conditional; ADM, Dhariwal & Nichol 2021, Table 14 / released model)
  adm_imagenet128   421.5M
  adm_imagenet256   553.8M

Every preset predicts as many channels as it takes in (``prediction_channels`` None); VDM's
Fourier features override ``in_channels`` and ``prediction_channels`` (configs/cifar10_vdm.yaml).
"""

from __future__ import annotations

from pipeline.models.classifier import ClassifierConfig
from pipeline.models.prior import PriorConfig
from pipeline.models.unet import UNetConfig

__all__ = ["PRESETS", "PUBLISHED_PARAMETERS"]

# Base ADM settings shared by every ImageNet model (guided-diffusion flags: --resblock_updown True
# --use_scale_shift_norm True --learn_sigma True --class_cond True --attention_resolutions 32,16,8).
_ADM = dict(
    attention_resolutions=(32, 16, 8),
    use_scale_shift_norm=True,
    resblock_updown=True,
    learn_sigma=True,
    num_classes=1000,
)

PRESETS: dict[str, UNetConfig | ClassifierConfig | PriorConfig] = {
    # Fast CPU network for tests and the quickstart (not a published model): 2 levels, 32 -> 16,
    # attention at 16x16.  Set num_classes to make it class-conditional.
    "tiny": UNetConfig(
        image_size=32,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.0,
        norm_groups=8,
    ),
    # DDPM CIFAR-10 (Ho et al. 2020, Sec. 4 and Appendix B): 128 channels, multipliers 1,2,2,2,
    # 2 residual blocks per resolution, single-head self-attention at 16x16, dropout 0.1,
    # additive timestep bias, convolutional resampling.  35.7M parameters.
    "ddpm_cifar10": UNetConfig(
        image_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
    ),
    # Improved DDPM CIFAR-10 (Nichol & Dhariwal 2021; improved-diffusion flags --image_size 32
    # --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3, and its defaults
    # --num_heads 4 --attention_resolutions 16,8 --use_scale_shift_norm True).
    "iddpm_cifar10": UNetConfig(
        image_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attention_resolutions=(16, 8),
        num_heads=4,
        dropout=0.3,
        use_scale_shift_norm=True,
        learn_sigma=True,
    ),
    # ADM ImageNet 64x64 (guided-diffusion flags: --num_channels 192 --num_res_blocks 3
    # --num_head_channels 64 --dropout 0.1 --use_new_attention_order True; mult 1,2,3,4).
    "adm_imagenet64": UNetConfig(
        image_size=64,
        base_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        num_head_channels=64,
        dropout=0.1,
        **_ADM,
    ),
    # ADM ImageNet 128x128 (guided-diffusion flags: --num_channels 256 --num_res_blocks 2
    # --num_heads 4; mult 1,1,2,3,4; dropout 0).
    "adm_imagenet128": UNetConfig(
        image_size=128,
        base_channels=256,
        channel_mult=(1, 1, 2, 3, 4),
        num_res_blocks=2,
        num_heads=4,
        dropout=0.0,
        **_ADM,
    ),
    # ADM ImageNet 256x256 (guided-diffusion flags: --num_channels 256 --num_res_blocks 2
    # --num_head_channels 64; mult 1,1,2,2,4,4; dropout 0).
    "adm_imagenet256": UNetConfig(
        image_size=256,
        base_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        num_head_channels=64,
        dropout=0.0,
        **_ADM,
    ),
    # ADM-U 64 -> 256 (guided-diffusion upsampler flags: --large_size 256 --small_size 64
    # --num_channels 192 --num_res_blocks 2 --num_heads 4; mult 1,1,2,2,4,4).  The 64x64 image is
    # bilinearly upsampled and concatenated to the 3 input channels.
    "adm_upsampler_64_256": UNetConfig(
        image_size=256,
        base_channels=192,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        num_heads=4,
        dropout=0.0,
        low_res_channels=3,
        **_ADM,
    ),
    # ADM noisy classifiers (guided-diffusion CLASSIFIER_FLAGS: --classifier_width 128
    # --classifier_attention_resolutions 32,16,8 --classifier_pool attention
    # --classifier_resblock_updown True --classifier_use_scale_shift_norm True, 64 channels per
    # head; depth 4 at 64x64, 2 at 128 and 256; the channel multipliers of the diffusion model
    # at that size).
    "adm_classifier_64": ClassifierConfig(
        image_size=64, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=4
    ),
    "adm_classifier_128": ClassifierConfig(
        image_size=128, base_channels=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2
    ),
    "adm_classifier_256": ClassifierConfig(
        image_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2
    ),
    # unCLIP diffusion prior (DALL-E 2, Ramesh et al. 2022, sec. 2.2; pipeline/models/prior.py).
    # Fast CPU prior for tests and the demo: set embed_dim to the CLIP model's embedding dimension.
    "prior_tiny": PriorConfig(embed_dim=64, width=128, layers=2, heads=4),
    # DALL-E 2's diffusion prior at its published size (Table 3 as we read it: 1B parameters, width 2048,
    # 24 layers; 1.22B here with 4x MLPs)
    # over ViT-H/16 CLIP embeddings (d = 1024); 32 heads of 64 channels is our choice (not published).
    "dalle2_prior": PriorConfig(embed_dim=1024, width=2048, layers=24, heads=32),
}

# Published parameter counts that the presets must reproduce (within 0.5%).
PUBLISHED_PARAMETERS: dict[str, float] = {
    "ddpm_cifar10": 35.7e6,
    "adm_imagenet64": 295.9e6,
    "adm_imagenet128": 421.5e6,
    "adm_imagenet256": 553.8e6,
}
