"""AdamW parameter groups shared by the models: weight decay on weight matrices and kernels only.

Decay pulls weights towards zero; on a norm gain, a bias, an embedding table or a learned scale that is a bias
towards a degenerate value rather than a regulariser (GPT-2 / open_clip practice), so those go in a group with
``weight_decay=0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def no_decay_names(module: torch.nn.Module, extra: Sequence[str] = ()) -> set[str]:
    """Names of the parameters that get no decay: 0-d/1-d tensors (biases, gains, scales), every parameter of a
    norm layer or an ``nn.Embedding``, parameters named ``*embedding`` (open_clip's positional/class embeddings)
    and any whose name contains one of ``extra`` (e.g. ``logit_`` for CLIP's logit scale and bias)."""
    names = set()
    for module_name, child in module.named_modules():
        for param_name, param in child.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if (param.ndim < 2 or isinstance(child, (*_NORMS, torch.nn.Embedding))
                    or param_name.endswith("embedding") or any(part in name for part in extra)):
                names.add(name)
    return names


def decay_groups(module: torch.nn.Module, weight_decay: float,
                 extra_no_decay: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Two AdamW groups of the trainable parameters: ``weight_decay`` on the rest, 0 on :func:`no_decay_names`."""
    skip = no_decay_names(module, extra_no_decay)
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
