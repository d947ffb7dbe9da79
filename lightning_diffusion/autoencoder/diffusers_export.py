"""A VAE-GAN as a diffusers `AutoencoderKL` (for `python -m lightning_diffusion export --format diffusers`).

The project's kl-f network maps onto `AutoencoderKL` block for block (conv_in, per-level ResNet blocks and a stride-2
/ nearest-upsampling convolution, mid ResNet-attention-ResNet, GroupNorm-SiLU-conv out; no quant convs) when:
- it was built with `downsample_padding: asymmetric` (diffusers pads (0, 1, 0, 1) before its stride-2 convolutions;
  a symmetric pad shifts every window by one pixel, which no weight change undoes);
- every GroupNorm has the same group count (diffusers has one `norm_num_groups`; widths that are multiples of 32);
- the decoder is as wide as the encoder (`decoder_channels` unset).
Depths need not match: diffusers' decoder has one ResNet block per level more than its encoder, and missing blocks
are filled with identity blocks (`conv2` zero, so `x + 0`), which is exact. The single-head attention's fused 1x1
`qkv` convolution splits into diffusers' `to_q`/`to_k`/`to_v` linear layers.
A VAE-GAN fine-tuned from a diffusers folder (`model.pretrained`) already is diffusers' network: its weights are copied.
`scaling_factor` is the VAE-GAN's `latent_scale` (measured, or the folder's for a decoder-only fine-tune, which
also keeps its `shift_factor`), so diffusers scales as we do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.autoencoder.diffusers_vae import autoencoder_kl_class
from lightning_diffusion.autoencoder.networks import AsymmetricDownsample, ResnetBlock, SelfAttention, Upsample
from lightning_diffusion.errors import UserError

RESNET = {"block.0": "norm1", "block.2": "conv1", "block.3": "norm2", "block.6": "conv2", "shortcut": "conv_shortcut"}


def _copy(target: dict[str, Tensor], module: nn.Module, prefix: str, names: dict[str, str] | None = None) -> None:
    """Every parameter of `module` into `target[prefix + renamed]` (1x1 conv kernels flattened for linear layers)."""
    for name, value in module.state_dict().items():
        head, _, leaf = name.rpartition(".")
        renamed = f"{names[head]}.{leaf}" if names is not None else name
        target[f"{prefix}{renamed}"] = value


def _attention(target: dict[str, Tensor], attention: SelfAttention, prefix: str) -> None:
    _copy(target, attention.norm, f"{prefix}group_norm.")
    weights, biases = attention.qkv.weight.flatten(1).chunk(3), attention.qkv.bias.chunk(3)
    for name, weight, bias in zip(("to_q", "to_k", "to_v"), weights, biases):
        target[f"{prefix}{name}.weight"], target[f"{prefix}{name}.bias"] = weight, bias
    target[f"{prefix}to_out.0.weight"] = attention.proj.weight.flatten(1)
    target[f"{prefix}to_out.0.bias"] = attention.proj.bias


def _mid(target: dict[str, Tensor], mid: nn.Sequential, prefix: str) -> None:
    blocks = [m for m in mid if isinstance(m, ResnetBlock)]
    for index, block in enumerate(blocks):
        _copy(target, block, f"{prefix}resnets.{index}.", RESNET)
    for module in mid:
        if isinstance(module, SelfAttention):
            _attention(target, module, f"{prefix}attentions.0.")


def _levels(layers: nn.Sequential) -> list[tuple[list[ResnetBlock], nn.Module | None]]:
    """Per level: its ResNet blocks and the resampling layer that ends it (None for the last level)."""
    levels: list[tuple[list[ResnetBlock], nn.Module | None]] = [([], None)]
    for layer in layers:
        if isinstance(layer, ResnetBlock):
            levels[-1][0].append(layer)
        else:
            levels[-1] = (levels[-1][0], layer)
            levels.append(([], None))
    return levels if levels[-1][0] else levels[:-1]


def _group_counts(vae: nn.Module) -> set[int]:
    return {m.num_groups for m in [*vae.encoder.modules(), *vae.decoder.modules()] if isinstance(m, nn.GroupNorm)}


def check_convertible(vae: nn.Module) -> None:
    """A `UserError` naming the setting when the kl-f network has no exact `AutoencoderKL` equivalent."""
    hp = vae.hparams
    if hp.get("downsample_padding", "symmetric") != "asymmetric":
        raise UserError("this VAE-GAN pads its stride-2 convolutions symmetrically; diffusers' AutoencoderKL pads "
                        "(0, 1, 0, 1), so it cannot be exported exactly: train with model.downsample_padding: "
                        "asymmetric to export to diffusers")
    if hp.decoder_channels not in (None, hp.channels):
        raise UserError(f"this VAE-GAN's decoder is wider (model.decoder_channels {hp.decoder_channels}) than its "
                        f"encoder ({hp.channels}); AutoencoderKL has one width for both: it cannot be exported")
    groups = _group_counts(vae)
    if len(groups) != 1:
        raise UserError(f"this VAE-GAN's GroupNorms have {sorted(groups)} groups at different widths; AutoencoderKL "
                        "has one norm_num_groups: export needs model.channels a multiple of 32")


def klf_config(vae: nn.Module) -> dict[str, Any]:
    """`AutoencoderKL` arguments of a convertible kl-f VAE-GAN (ResNet blocks per level: the larger depth)."""
    hp = vae.hparams
    levels = len(hp.channel_mults)
    layers = max(hp.num_blocks, (hp.decoder_num_blocks or hp.num_blocks) - 1)
    return {
        "in_channels": hp.in_channels, "out_channels": hp.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [hp.channels * m for m in hp.channel_mults], "layers_per_block": layers,
        "act_fn": "silu", "latent_channels": hp.latent_channels, "norm_num_groups": _group_counts(vae).pop(),
        "sample_size": hp.image_size, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": hp.mid_attention,
    }


def klf_state_dict(vae: nn.Module, autoencoder: nn.Module) -> dict[str, Tensor]:
    """The kl-f weights under `AutoencoderKL`'s names; blocks diffusers has in addition become identities."""
    target: dict[str, Tensor] = {}
    encoder, decoder = vae.encoder, vae.decoder
    _copy(target, encoder.conv_in, "encoder.conv_in.")
    for level, (blocks, down) in enumerate(_levels(encoder.down)):
        for index, block in enumerate(blocks):
            _copy(target, block, f"encoder.down_blocks.{level}.resnets.{index}.", RESNET)
        if isinstance(down, AsymmetricDownsample):
            _copy(target, down, f"encoder.down_blocks.{level}.downsamplers.0.conv.")
    _mid(target, encoder.mid, "encoder.mid_block.")
    _copy(target, encoder.out[0], "encoder.conv_norm_out.")
    _copy(target, encoder.out[2], "encoder.conv_out.")
    _copy(target, decoder.conv_in, "decoder.conv_in.")
    _mid(target, decoder.mid, "decoder.mid_block.")
    for level, (blocks, up) in enumerate(_levels(decoder.up)):
        for index, block in enumerate(blocks):
            _copy(target, block, f"decoder.up_blocks.{level}.resnets.{index}.", RESNET)
        if isinstance(up, Upsample):
            _copy(target, up.conv, f"decoder.up_blocks.{level}.upsamplers.0.conv.")
    _copy(target, decoder.norm_out[0], "decoder.conv_norm_out.")
    _copy(target, decoder.conv_out, "decoder.conv_out.")
    for name, value in autoencoder.state_dict().items():
        if name not in target:  # an extra ResNet block: x + conv2(...) with conv2 = 0 is x
            if ".resnets." not in name:
                raise RuntimeError(f"no kl-f weight maps to AutoencoderKL's {name}")
            target[name] = torch.zeros_like(value) if ".conv2." in name else value
    return target


def to_autoencoder_kl(vae: nn.Module) -> nn.Module:
    """The VAE-GAN as an `AutoencoderKL` (float32, eval) with `scaling_factor` = its `latent_scale`."""
    cls = autoencoder_kl_class()
    scaling = {"scaling_factor": float(vae.latent_scale), "shift_factor": vae.latent_shift or None}
    pretrained = vae.hparams.get("pretrained_config")
    if pretrained:
        autoencoder = cls.from_config({**pretrained, **scaling})
        state = {name.split(".", 1)[1]: value for name, value in vae.state_dict().items()
                 if name.startswith(("encoder.", "decoder."))}
    else:
        check_convertible(vae)
        autoencoder = cls.from_config({**klf_config(vae), **scaling})
        state = klf_state_dict(vae, autoencoder)
    autoencoder.load_state_dict(state, strict=True)
    return autoencoder.float().eval()


@torch.no_grad()
def max_difference(vae: nn.Module, autoencoder: nn.Module, seed: int = 0) -> float:
    """Largest absolute difference of posterior means and decodings between the two on a random input."""
    size = vae.downsampling_factor * 4
    x = torch.rand(2, vae.hparams.in_channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    ours, theirs = vae.encode(x), autoencoder.encode(x).latent_dist
    z = ours.mean
    return max((ours.mean - theirs.mean).abs().max().item(), (ours.logvar - theirs.logvar).abs().max().item(),
               (vae.decode(z) - autoencoder.decode(z).sample).abs().max().item())


def export_autoencoder(path: str | Path, out: Path) -> str:
    """Any frozen autoencoder (a VAE-GAN checkpoint, or an `AutoencoderKL` folder, re-saved as safetensors) as an
    `AutoencoderKL` folder `out`: the `vae/` part of a denoiser's diffusers export, say. Returns a summary line."""
    if Path(path).is_dir():
        from lightning_diffusion.autoencoder.diffusers_vae import load_autoencoder_kl

        load_autoencoder_kl(path, key="--ckpt").save_pretrained(str(out), safe_serialization=True)
        return f"AutoencoderKL copied from {path}"
    return export_vae_gan(Path(path), out)


def export_vae_gan(ckpt: Path, out: Path) -> str:
    """Write the VAE-GAN checkpoint `ckpt` as an `AutoencoderKL` folder `out` (safetensors); a summary line."""
    from lightning_diffusion.autoencoder.module import VAEGAN

    vae = VAEGAN.load_frozen(ckpt).float()
    autoencoder = to_autoencoder_kl(vae)
    difference = max_difference(vae, autoencoder)
    if difference > 1e-4:
        raise RuntimeError(f"the exported AutoencoderKL differs from the VAE-GAN by {difference:.3g}")
    autoencoder.save_pretrained(str(out), safe_serialization=True)
    shift = f", shift_factor {vae.latent_shift:.6g}" if vae.latent_shift else ""
    return (f"AutoencoderKL with scaling_factor {float(vae.latent_scale):.6g}{shift} (max |difference| to the "
            f"VAE-GAN {difference:.2g})")
