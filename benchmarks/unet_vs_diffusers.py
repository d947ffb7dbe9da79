"""P2: one training step of our U-Net vs diffusers' `UNet2DConditionModel` of the same size. Target <= 1.0.

Same input (channels, resolution, batch), same text context (length, width, padding mask), same structure
(levels, ResBlocks per level, cross-attention at the same feature-map sizes, a middle block with attention, time
embedding of 4x the base width), heads per attention block; diffusers is configured as in Stable Diffusion
(`CrossAttnDownBlock2D` where we attend, `DownBlock2D` elsewhere, linear projections, GroupNorm 32). The ratio
is taken with our attention blocks ending in a GEGLU feed-forward (`feed_forward=True`), the layout of diffusers'
transformer blocks, so both networks have the same widths; our base width is still chosen to match diffusers'
parameter count (within --tolerance; both counts are reported). Also measured, in the same alternation and
reported beside the ratio: our default attention blocks (no feed-forward: a wider base width matches the count)
in NCHW and in channels_last memory, and diffusers in channels_last memory. One step = forward, MSE to a fixed
target, backward, AdamW step, on the same batch; seconds/step after warm-up steps, median of --repeats
alternating runs.

    python benchmarks/unet_vs_diffusers.py                   # 4x32x32 latents, 77x512 context, batch 8
    python benchmarks/unet_vs_diffusers.py --quick
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import add_common_arguments, alternate, finish_arguments, median, resolve_device, seconds, write_result

from lightning_diffusion.diffusion.unet import UNet

FULL = dict(in_channels=4, image_size=32, batch_size=8, context_length=77, context_dim=512, diffusers_base=64,
            channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(16, 8), num_heads=4)
QUICK = dict(in_channels=4, image_size=16, batch_size=2, context_length=8, context_dim=32, diffusers_base=32,
             channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_unet(cfg: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    levels = range(len(cfg["channel_mult"]))
    attends = [cfg["image_size"] // 2**level in cfg["attention_resolutions"] for level in levels]
    return UNet2DConditionModel(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["in_channels"],
        block_out_channels=tuple(cfg["diffusers_base"] * m for m in cfg["channel_mult"]),
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cfg["context_dim"],
        attention_head_dim=cfg["num_heads"],  # diffusers' legacy name: this is the number of heads
        use_linear_projection=True, norm_num_groups=32,
    )


def our_unet(cfg: dict[str, Any], base_channels: int, **options: bool) -> UNet:
    return UNet(in_channels=cfg["in_channels"], image_size=cfg["image_size"], base_channels=base_channels,
                channel_mult=cfg["channel_mult"], num_res_blocks=cfg["num_res_blocks"],
                attention_resolutions=cfg["attention_resolutions"], num_heads=cfg["num_heads"],
                context_dim=cfg["context_dim"], **options)


def matched_base(cfg: dict[str, Any], target: int, feed_forward: bool) -> int:
    """Our base width (a multiple of the head count) whose parameter count is closest to `target`."""
    step = cfg["num_heads"]
    best, best_gap = step, None
    for base in range(step, 8 * cfg["diffusers_base"] + 1, step):
        with torch.device("meta"):  # counts without allocating weights
            gap = abs(count(our_unet(cfg, base, feed_forward=feed_forward)) - target)
        if best_gap is not None and gap > best_gap:
            break  # the count grows with the width
        best, best_gap = base, gap
    return best


def training_step(model: nn.Module, call: Callable[[], torch.Tensor], target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.mse_loss(call(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps of each model first (default 2, quick 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (quick 2)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative parameter-count gap")
    add_common_arguments(parser, repeats=3)
    args = finish_arguments(parser.parse_args(argv))
    cfg = dict(QUICK if args.quick else FULL)
    cfg["batch_size"] = args.batch_size or cfg["batch_size"]
    steps, warmup = args.steps or (2 if args.quick else 5), args.warmup or (1 if args.quick else 2)
    device = resolve_device(args.device)

    torch.manual_seed(0)
    theirs = diffusers_unet(cfg)
    base = matched_base(cfg, count(theirs), feed_forward=True)
    plain_base = matched_base(cfg, count(theirs), feed_forward=False)
    models: dict[str, nn.Module] = {
        "ours": our_unet(cfg, base, feed_forward=True),
        "diffusers": theirs,
        "ours_no_feed_forward": our_unet(cfg, plain_base),
        "ours_no_feed_forward_channels_last": our_unet(cfg, plain_base, channels_last=True),
        "diffusers_channels_last": diffusers_unet(cfg).to(memory_format=torch.channels_last),
    }
    gaps = {name: count(model) / count(theirs) - 1 for name, model in models.items()}
    for name in ("ours", "ours_no_feed_forward"):
        if abs(gaps[name]) > args.tolerance:
            raise SystemExit(f"{name}: parameter counts differ by {gaps[name]:.1%} (> {args.tolerance:.0%}): "
                             "change the sizes")
    print(f"parameters: ours {count(models['ours']):,} (base {base}, feed-forward), ours without feed-forward "
          f"{count(models['ours_no_feed_forward']):,} (base {plain_base}), diffusers {count(theirs):,} "
          f"(base {cfg['diffusers_base']}); gaps {gaps['ours']:+.1%}, {gaps['ours_no_feed_forward']:+.1%}")

    b, size, length = cfg["batch_size"], cfg["image_size"], cfg["context_length"]
    x = torch.randn(b, cfg["in_channels"], size, size, device=device)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (b,), device=device)
    context = torch.randn(b, length, cfg["context_dim"], device=device)
    lengths = torch.randint(1, length + 1, (b,), device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]  # True = real token
    x_channels_last = x.contiguous(memory_format=torch.channels_last)

    def call(name: str, model: nn.Module) -> Callable[[], torch.Tensor]:
        if name.startswith("diffusers"):
            sample = x_channels_last if name.endswith("channels_last") else x
            return lambda: model(sample, t, encoder_hidden_states=context,
                                 encoder_attention_mask=mask.float()).sample
        return lambda: model(x, t.float(), context=context, context_mask=mask)  # channels_last: converted inside

    steps_of = {}
    for name, model in models.items():
        model.to(device).train()
        steps_of[name] = training_step(model, call(name, model), target)
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    runs = alternate({name: (lambda s=step: seconds(lambda: [s() for _ in range(steps)], device) / steps)
                      for name, step in steps_of.items()}, args.repeats)
    s_per_step = {name: median(values) for name, values in runs.items()}
    ours_s, theirs_s = s_per_step["ours"], s_per_step["diffusers"]
    extra = {  # same alternation, not the target ratio
        "ours_no_feed_forward / diffusers": s_per_step["ours_no_feed_forward"] / theirs_s,
        "ours_no_feed_forward_channels_last / diffusers": s_per_step["ours_no_feed_forward_channels_last"] / theirs_s,
        "ours_no_feed_forward_channels_last / diffusers_channels_last":
            s_per_step["ours_no_feed_forward_channels_last"] / s_per_step["diffusers_channels_last"],
        "diffusers_channels_last / diffusers": s_per_step["diffusers_channels_last"] / theirs_s,
    }
    result = {
        "device": str(device), "batch_size": b, "input": [cfg["in_channels"], size, size],
        "context": [length, cfg["context_dim"]], "channel_mult": list(cfg["channel_mult"]),
        "num_res_blocks": cfg["num_res_blocks"], "attention_resolutions": list(cfg["attention_resolutions"]),
        "num_heads": cfg["num_heads"], "steps_timed": steps, "warmup_steps": warmup,
        "ours_base_channels": base, "ours_feed_forward": True, "ours_no_feed_forward_base_channels": plain_base,
        "diffusers_block_out_channels": [cfg["diffusers_base"] * m for m in cfg["channel_mult"]],
        "ours_parameters": count(models["ours"]), "diffusers_parameters": count(theirs),
        "parameter_gap": round(gaps["ours"], 4),
        "ours_no_feed_forward_parameters": count(models["ours_no_feed_forward"]),
        "ours_no_feed_forward_parameter_gap": round(gaps["ours_no_feed_forward"], 4),
        "ours_s_per_step": round(ours_s, 5), "diffusers_s_per_step": round(theirs_s, 5),
        "s_per_step": {name: round(value, 5) for name, value in s_per_step.items()},
        "extra_ratios": {name: round(value, 3) for name, value in extra.items()},
        "all_runs_s_per_step": {name: [round(v, 5) for v in values] for name, values in runs.items()},
    }
    write_result("unet_vs_diffusers", args, result, ratio=ours_s / theirs_s, target="<= 1.0",
                 ratio_definition=("our U-Net (attention blocks with feed-forward, as diffusers') s/step / diffusers "
                                   "UNet2DConditionModel s/step (forward+backward+AdamW), matched parameters"),
                 packages=("diffusers",), device=device,
                 summary=("ours_parameters", "diffusers_parameters", "ours_s_per_step", "diffusers_s_per_step",
                          "extra_ratios"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
