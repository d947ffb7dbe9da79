"""Seconds per training step of the denoiser with `model.compile: true` (torch.compile of the U-Net) vs eager.

Both models start from the same weights and train on the same batches with the same draws (timesteps, noise): a
hand-written step of `Denoiser.training_step`'s work (class condition, `loss_at`, backward, AdamW step of
`configure_optimizers`), so that only the network's execution differs. The compiled model's first run (the
compilation, reported as `compile_s`) is untimed; then `--repeats` alternating runs of `--steps` steps each, median
seconds/step. On the CPU the ratio uses the process's CPU time (`time.process_time`): on a shared, loaded machine the
wall clock mostly measures waiting for a core (both are reported; on a GPU it is the wall clock). The losses of the
two are compared as a check that they computed the same thing.

    python benchmarks/compile.py                      # 32 px U-Net (channel_mult 1,2), batch 16, inductor, CPU
    python benchmarks/compile.py --quick              # 16 px, a smoke check (results/quick/)
    python benchmarks/compile.py --backend aot_eager  # graph capture without code generation
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

from common import add_common_arguments, alternate, finish_arguments, median, resolve_device, seconds, write_result

from lightning_diffusion.diffusion.module import Denoiser

FULL = dict(image_size=32, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
            num_heads=4)
QUICK = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             num_heads=2)
NUM_CLASSES = 10


def build(unet: dict[str, Any], device: torch.device, **compile_args: Any) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(conditioning="class", num_classes=NUM_CLASSES, ema_decay=None, p_uncond=0.0, lr=1e-4,
                    **unet, **compile_args).to(device)


def make_batches(steps: int, batch_size: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Smooth random images, labels, timesteps and noise: the same draws for both models."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        coarse = torch.rand(batch_size, 3, size // 4, size // 4, generator=generator) * 2 - 1
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
        batches.append({"image": image.to(device), "label": torch.randint(0, NUM_CLASSES, (batch_size,),
                                                                          generator=generator).to(device),
                        "t": torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
                        "noise": torch.randn(image.shape, generator=generator).to(device)})
    return batches


def train(model: Denoiser, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    losses = []
    for batch in batches:
        condition = model.make_condition(labels=batch["label"])
        loss = model.loss_at(batch["image"], batch["noise"], batch["t"], condition)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return [float(loss) for loss in losses]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--mode", default=None, help="inductor mode (default: none)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10, quick 3)")
    add_common_arguments(parser, repeats=3)
    args = finish_arguments(parser.parse_args(argv))
    args.batch_size = args.batch_size or (4 if args.quick else 16)
    args.steps = args.steps or (3 if args.quick else 10)
    device = resolve_device(args.device)
    unet = QUICK if args.quick else FULL
    eager = build(unet, device)
    compiled = build(unet, device, compile=True, compile_backend=args.backend, compile_mode=args.mode)
    batches = make_batches(args.steps, args.batch_size, unet["image_size"], device)
    optimizers = {"eager": eager.configure_optimizers()["optimizer"],
                  "compiled": compiled.configure_optimizers()["optimizer"]}
    first_losses: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu_clock = device.type == "cpu"

    def run(name: str, model: Denoiser) -> Any:
        def timed() -> float:
            losses: list[float] = []
            cpu_start = time.process_time()
            elapsed = seconds(lambda: losses.extend(train(model, optimizers[name], batches)), device)
            cpu = time.process_time() - cpu_start
            first_losses.setdefault(name, losses)
            wall[name].append(elapsed / len(batches))
            return (cpu if cpu_clock else elapsed) / len(batches)
        return timed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        run("compiled", compiled)()  # compiles forward and backward (same shapes afterwards: no recompilation)
        compile_s = time.perf_counter() - start
        run("eager", eager)()  # the same optimiser steps, so both continue from equal weights
        for values in wall.values():  # keep only the timed runs
            values.clear()
        runs = alternate({"eager": run("eager", eager), "compiled": run("compiled", compiled)}, args.repeats)
    eager_s, compiled_s = median(runs["eager"]), median(runs["compiled"])
    loss_diff = max(abs(a - b) for a, b in zip(first_losses["eager"], first_losses["compiled"]))
    result = {"device": str(device), "backend": args.backend, "mode": args.mode, "batch_size": args.batch_size,
              "steps_per_run": args.steps, "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()},
              "parameters": sum(p.numel() for p in eager.parameters()), "compile_s": round(compile_s, 2),
              "clock": "process CPU time" if cpu_clock else "wall",
              "eager_s_per_step": round(eager_s, 5), "compiled_s_per_step": round(compiled_s, 5),
              "all_runs_s_per_step": {name: [round(v, 5) for v in values] for name, values in runs.items()},
              "wall_s_per_step": {name: [round(v, 5) for v in values] for name, values in wall.items()},
              "wall_ratio": round(median(wall["compiled"]) / median(wall["eager"]), 3),
              "first_run_losses_max_abs_diff": loss_diff}
    write_result("compile", args, result, ratio=compiled_s / eager_s, target="<= 1.0",
                 ratio_definition="compiled s/step / eager s/step (U-Net training step, compilation excluded; CPU: "
                                  "process CPU time)",
                 device=device, summary=("backend", "compile_s", "eager_s_per_step", "compiled_s_per_step"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
