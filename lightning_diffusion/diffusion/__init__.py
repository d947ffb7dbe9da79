"""Diffusion: noise schedules, training objectives, samplers, guidance, the U-Net and the denoiser module."""
