"""Metric names that say what was measured: the encoder and the sample count are part of the key.

A Fréchet distance depends on the feature space and strongly on the number of samples, so `fid@5k` alone
is ambiguous. Only Inception-v3 pool3 features give the standard FID; other encoders give a Fréchet distance
(`fd_clip@1k`) that is useful for comparing runs but not comparable with published numbers.
"""

from __future__ import annotations

ENCODERS: tuple[str, ...] = ("inception", "clip", "effnet")


def format_count(num_samples: int) -> str:
    """`5000 -> '5k'`, `1500 -> '1.5k'`, `500 -> '500'`, `50000 -> '50k'`."""
    if num_samples < 1000 or num_samples % 100:
        return str(num_samples)
    thousands = num_samples / 1000
    return f"{thousands:g}k"


def metric_key(metric: str, encoder: str | None, num_samples: int, role: str | None = None) -> str:
    """Name a metric result, e.g. `metric_key('fid', 'clip', 1000) == 'fd_clip@1k'`.

    `fid`/`kid` keep their names with Inception and become `fd`/`kd` with any other encoder; other metrics
    (`lpips`, `clip_score`, `psnr`, ...) get `_<encoder>` when an encoder (or network) is involved. `role` says
    what was compared when it is not generated samples: `metric_key('fid', 'effnet', 500, 'recon') ==
    'fd_effnet_recon@500'` (reconstructions against their inputs).
    """
    if metric in ("fid", "kid"):
        if encoder is None:
            raise ValueError(f"{metric} needs an encoder name")
        metric = metric if encoder == "inception" else metric.replace("i", "", 1)
    parts = [metric, *(part for part in (encoder, role) if part)]
    return f"{'_'.join(parts)}@{format_count(num_samples)}"
