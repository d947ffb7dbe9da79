"""Noisy-image classifiers for classifier guidance (Dhariwal & Nichol 2021)."""
