"""P6: classifier-free guided sampling with one batched forward (2B) per step vs two forwards (B each).

`lightning_diffusion.diffusion.guidance.classifier_free_guidance` runs the conditional and the null condition in one
forward of `cat([x, x])`; the baseline calls the model twice per step. Both drive the same DDIM sampler from the
same noise with the same guidance weight, so the samples must agree (asserted with `allclose`); the time of a
whole sampling run is compared, median of --repeats alternating runs. Target >= 1.0 (the issue names none:
batching must at least not be slower; it pays most where one forward of B does not fill the device).

The model is a trained denoiser (--ckpt) or, by default, a fresh pixel-space one conditioned on the offline
MiniLM text encoder (or --conditioning class) whose zero-initialised output layers are re-drawn, so that the
prediction is not identically zero and the comparison means something.

    python benchmarks/cfg_batched.py                          # 32 px, batch 16, DDIM 25 steps, guidance 3
    python benchmarks/cfg_batched.py --ckpt runs/quickstart/denoiser/checkpoints/last.ckpt
    python benchmarks/cfg_batched.py --quick
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from common import add_common_arguments, alternate, finish_arguments, median, resolve_device, seconds, write_result

from lightning_diffusion.diffusion.guidance import classifier_free_guidance
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.diffusion.denoisers import SamplingDenoiser
from lightning_diffusion.diffusion.noise_grids import discrete_timesteps
from lightning_diffusion.diffusion.samplers import ddim_sample
from lightning_diffusion.diffusion.seeding import initial_noise

FULL = dict(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16, 8),
            num_heads=4)  # configs/denoiser/pixel_tiny.yaml
QUICK = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             num_heads=2)
CAPTIONS = ["a 3D rendered emoji of koala", "a flat vector emoji of red apple", "a flat vector emoji of rocket",
            "a 3D rendered emoji of smiling face with sunglasses"]


def fresh_model(conditioning: str, unet: dict[str, Any]) -> Denoiser:
    torch.manual_seed(0)
    extra = {"text": dict(conditioning="text", text_encoder="minilm"),
             "class": dict(conditioning="class", num_classes=10)}[conditioning]
    model = Denoiser(space="pixel", objective="eps", ema_decay=None, **unet, **extra)
    with torch.no_grad():  # the zero-initialised residual ends and output layer would make every prediction 0
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    return model.eval()


def two_forwards(model: Denoiser, cond: dict[str, Tensor], null: dict[str, Tensor], scale: float) -> Any:
    """The baseline: the conditional and the unconditional prediction from separate forwards."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        cond_out, uncond_out = model(x, t, cond), model(x, t, null)
        return uncond_out + scale * (cond_out - uncond_out)

    return guided


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="a denoiser checkpoint (default: a fresh model)")
    parser.add_argument("--conditioning", choices=("text", "class"), default="text", help="of the fresh model")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per run (default 16, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25, quick 3)")
    parser.add_argument("--guidance", type=float, default=3.0)
    add_common_arguments(parser, repeats=3)
    args = finish_arguments(parser.parse_args(argv))
    batch, steps = args.batch_size or (2 if args.quick else 16), args.steps or (3 if args.quick else 25)
    device = resolve_device(args.device)

    if args.ckpt:
        from lightning_diffusion.commands.sample import load_denoiser

        model = load_denoiser(args.ckpt)
    else:
        model = fresh_model(args.conditioning, QUICK if args.quick else FULL)
    if not model.guidable:
        raise SystemExit(f"{args.ckpt} has no text or class condition to guide")
    model.to(device)
    if "text" in model.kinds:
        cond = model.make_condition(captions=[CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    else:
        cond = model.make_condition(labels=torch.arange(batch) % model.hparams.num_classes)
    null = model.null.null_like(cond)
    clip = 1.0 if model.hparams.space == "pixel" else None  # as Denoiser.generate
    shape = (batch, *model.sample_shape)
    fns = {"batched": classifier_free_guidance(model.forward, cond, null, args.guidance),
           "two_forwards": two_forwards(model, cond, null, args.guidance)}

    def sample(name: str) -> Tensor:
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            denoiser = SamplingDenoiser(fns[name], model.hparams.objective, model.schedule, clip_x0=clip)
            timesteps = discrete_timesteps(model.schedule.num_timesteps, steps)
            return ddim_sample(denoiser, initial_noise(shape, generator), timesteps, generator)

    batched, separate = sample("batched"), sample("two_forwards")  # also the warm-up
    max_diff = (batched - separate).abs().max().item()
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-4)
    runs = alternate({name: (lambda n=name: seconds(lambda: sample(n), device)) for name in fns}, args.repeats)
    batched_s, separate_s = median(runs["batched"]), median(runs["two_forwards"])
    result = {"device": str(device), "model": args.ckpt or f"fresh pixel-space, {args.conditioning}-conditioned",
              "conditioning": model.hparams.conditioning, "sample_shape": list(shape), "ddim_steps": steps,
              "guidance": args.guidance, "parameters": sum(p.numel() for p in model.parameters()),
              "samples_max_abs_diff": max_diff,
              "batched_s": round(batched_s, 4), "two_forwards_s": round(separate_s, 4),
              "all_runs_s": {name: [round(v, 4) for v in values] for name, values in runs.items()}}
    write_result("cfg_batched", args, result, ratio=separate_s / batched_s, target=">= 1.0",
                 ratio_definition="two-forward sampling seconds / batched sampling seconds (speed-up)", device=device,
                 summary=("batched_s", "two_forwards_s", "samples_max_abs_diff"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
