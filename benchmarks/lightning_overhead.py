"""P1: seconds per training step of the denoiser under Lightning's `Trainer.fit` vs a hand-written loop. Target <= 1.05.

Both train the same `Denoiser` (pixel space, same initial weights and seed) on the same in-memory batches, fed by
the same `DataLoader`, with the optimiser and warm-up schedule of `configure_optimizers` (AdamW + LambdaLR,
stepped every batch). The hand loop does exactly the work of `Denoiser.training_step` (condition, classifier-free
drop mask, timesteps, noise, `loss_at`, the finite-loss check), then zero_grad / backward / step. The Trainer runs
in 32-true precision with no logger, checkpointing, progress bar, model summary or validation. EMA is off in both,
or with --ema on in both (Lightning's `EMAWeightAveraging` vs torch's `AveragedModel` with the same decay).

Variants: `class` (class-conditioned, no checkpoint needed) and `text_minilm` (cross-attention to the offline
all-MiniLM-L6-v2 encoder, skipped when it cannot load). Seconds/step leave out the first `--warmup` steps; median
of `--repeats` alternating runs. Both loops draw the same random numbers, so their final weights should agree:
the largest difference is reported as a check that they did the same work.

    python benchmarks/lightning_overhead.py                 # pixel_tiny's U-Net, 32 px, batch 32
    python benchmarks/lightning_overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import (
    StepClock, add_common_arguments, alternate, clock_callback, finish_arguments, median, resolve_device, write_result,
)

from lightning_diffusion.diffusion.conditioning import uncond_drop_mask
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.errors import UserError

FULL = dict(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16, 8),
            num_heads=4)  # configs/denoiser/pixel_tiny.yaml
QUICK = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             num_heads=2)
NUM_CLASSES = 10
CAPTIONS = ["a 3D rendered emoji of koala", "a flat vector emoji of red apple", "a flat vector emoji of rocket",
            "a 3D rendered emoji of smiling face with sunglasses"]


def build_model(variant: str, unet: dict[str, Any], ema: bool, seed: int) -> Denoiser:
    torch.manual_seed(seed)
    conditioning = {"class": dict(conditioning="class", num_classes=NUM_CLASSES),
                    "text_minilm": dict(conditioning="text", text_encoder="minilm")}[variant]
    return Denoiser(space="pixel", objective="eps", lr=5e-4, warmup_steps=100, ema_decay=0.999 if ema else None,
                    seed=seed, **unet, **conditioning)


def make_batches(model: Denoiser, steps: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """Smooth random images in [-1, 1] with labels or (pre-tokenised, as the DataModule's workers do) captions."""
    generator = torch.Generator().manual_seed(seed)
    size = model.hparams.image_size
    batches = []
    for _ in range(steps):
        coarse = torch.rand(batch_size, 3, size // 4, size // 4, generator=generator) * 2 - 1
        batch: dict[str, Any] = {"image": torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")}
        if "class" in model.kinds:
            batch["label"] = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        if "text" in model.kinds:
            captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
            batch["caption"], batch["tokens"] = captions, model.tokenizer(captions)
        batches.append(batch)
    return batches


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def lightning_run(model: Denoiser, batches: list[dict[str, Any]], device: torch.device, clock: StepClock) -> None:
    import lightning.pytorch as pl

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the num_workers / batch-size inference hints
        trainer = pl.Trainer(max_steps=len(batches), accelerator=device.type, devices=1, precision="32-true",
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             callbacks=[clock_callback(clock)], default_root_dir=root)
        trainer.fit(model, DataLoader(batches, batch_size=None))


def hand_run(model: Denoiser, batches: list[dict[str, Any]], device: torch.device, clock: StepClock) -> None:
    """`Denoiser.training_step`'s work in a plain loop, with the optimiser and schedule of `configure_optimizers`."""
    model.to(device).train()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    average = None
    if model.hparams.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

        average = AveragedModel(model, device=device, avg_fn=get_ema_avg_fn(model.hparams.ema_decay), use_buffers=True)
    hp = model.hparams
    for step, batch in enumerate(DataLoader(batches, batch_size=None)):
        batch = to_device(batch, device)
        x0 = model.batch_x0(batch)
        condition = model.batch_condition(batch)
        if model.guidable:
            # one epoch, so batch_idx = step; rank 0
            drop = uncond_drop_mask(x0.shape[0], hp.p_uncond, hp.seed, step, step, 0).to(device)
            condition = model.null.drop(condition, drop)
        t = torch.randint(0, model.schedule.num_timesteps, (x0.shape[0],), device=device)
        loss = model.loss_at(x0, torch.randn_like(x0), t, condition)
        if not torch.isfinite(loss):
            raise UserError(f"the training loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(model)
        clock.stamp()
    if average is not None:  # as the callback does at the end of fit
        model.load_state_dict(average.module.state_dict())


def measure_variant(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    unet = QUICK if args.quick else FULL
    model = build_model(variant, unet, args.ema, args.seed)
    initial = copy.deepcopy(model.state_dict())
    batches = make_batches(model, args.warmup + args.steps, args.batch_size, args.seed)
    final: dict[str, dict[str, torch.Tensor]] = {}
    totals: dict[str, list[float]] = {"lightning": [], "hand_loop": []}

    def run(name: str, loop: Any) -> Any:
        def timed() -> float:
            model.load_state_dict(initial)
            torch.manual_seed(args.seed)
            clock = StepClock(device)
            clock.stamp()
            loop(model, batches, device, clock)
            final[name] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            totals[name].append(clock.stamps[-1] - clock.stamps[0])
            return clock.seconds_per_step(args.warmup + 1)
        return timed

    runs = alternate({"lightning": run("lightning", lightning_run), "hand_loop": run("hand_loop", hand_run)},
                     args.repeats)
    weight_diff = max((final["lightning"][k].float() - final["hand_loop"][k].float()).abs().max().item()
                      for k in final["hand_loop"])
    lightning_s, hand_s = median(runs["lightning"]), median(runs["hand_loop"])
    return {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "lightning_s_per_step": round(lightning_s, 5), "hand_loop_s_per_step": round(hand_s, 5),
            "all_runs_s_per_step": {name: [round(v, 5) for v in values] for name, values in runs.items()},
            "run_total_s_median": {name: round(median(values), 3) for name, values in totals.items()},
            "final_weights_max_abs_diff": weight_diff, "ratio": round(lightning_s / hand_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="class,text_minilm", help="comma-separated: class, text_minilm")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 40, quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps of each run (default 5, quick 2)")
    parser.add_argument("--ema", action="store_true", help="EMA of the weights in both loops")
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser, repeats=3)
    args = finish_arguments(parser.parse_args(argv))
    args.batch_size = args.batch_size or (4 if args.quick else 32)
    args.steps = args.steps or (4 if args.quick else 40)
    args.warmup = args.warmup or (2 if args.quick else 5)
    device = resolve_device(args.device)

    variants: dict[str, Any] = {}
    for variant in args.variants.split(","):
        try:
            variants[variant] = measure_variant(variant, args, device)
        except (OSError, ImportError) as err:  # MiniLM's files missing on this machine
            variants[variant] = {"skipped": f"{type(err).__name__}: {err}"}
        print(variant, variants[variant])
    measured = {name: v for name, v in variants.items() if "ratio" in v}
    if not measured:
        raise SystemExit("no variant could run")
    worst = max(measured, key=lambda name: measured[name]["ratio"])
    image_size = (QUICK if args.quick else FULL)["image_size"]
    result = {"device": str(device), "batch_size": args.batch_size, "image_size": image_size,
              "steps_timed": args.steps, "warmup_steps": args.warmup, "ema": args.ema, "worst_variant": worst,
              "variants": variants}
    write_result("lightning_overhead", args, result, ratio=measured[worst]["ratio"], target="<= 1.05",
                 ratio_definition="Lightning s/step / hand-loop s/step, worst variant", device=device,
                 packages=("transformers", "sentence-transformers"), summary=("worst_variant",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
