"""Evaluation metrics: FID/KID on named encoders, cached real statistics, LPIPS and CLIP score (torchmetrics).

Modules: `keys` (metric names), `encoders` (frozen feature extractors, offline weights), `frechet` (FID/KID),
`real_stats` (cached real-data statistics), `clip_score` (CLIP score with the project's CLIP).
"""
