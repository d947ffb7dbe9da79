"""AdamW groups (training/optim.py), shared by the denoiser and CLIP: decay on weight matrices and kernels only."""

from __future__ import annotations

import torch
from denoiser_support import TINY_UNET
from torch import nn

from lightning_diffusion.clip import CLIPModule
from lightning_diffusion.diffusion.module import Denoiser
from lightning_diffusion.training.optim import decay_groups, no_decay_names


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norms = nn.ModuleList([nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4)])
        self.table = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(8, 4))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_the_rule_on_every_kind_of_parameter() -> None:
    skip = no_decay_names(Toy(), ("logit_",))
    assert skip == {"linear.bias", "conv.bias", "norms.0.weight", "norms.0.bias", "norms.1.weight", "norms.1.bias",
                    "norms.2.weight", "norms.2.bias", "table.weight", "positional_embedding", "logit_scale",
                    "frozen.bias"}
    decay, no_decay = decay_groups(Toy(), 0.1, ("logit_",))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert [p.shape for p in decay["params"]] == [(4, 4), (4, 3, 3, 3)]  # frozen weights are left out
    assert len(no_decay["params"]) == 11


def test_denoiser_decays_only_its_kernels_and_an_adamw_step_shows_it() -> None:
    torch.manual_seed(0)
    model = Denoiser(conditioning="class", num_classes=4, weight_decay=0.5, lr=0.1, warmup_steps=1, **TINY_UNET)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(name.endswith("weight") and model.get_parameter(name).ndim >= 2 for name in decayed)
    assert "unet.label_embed.weight" not in decayed
    assert not any("norm" in name for name in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only the decoupled decay moves weights, by the factor 1 - lr * decay
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name in decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_clip_keeps_embeddings_norms_biases_and_the_logit_scale_out_of_decay() -> None:
    model = CLIPModule(model_name="ld-tiny-vit", image_size=16, weight_decay=0.2)
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    names = {id(p): name for name, p in model.model.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding"} <= kept
    assert all(model.model.get_parameter(names[id(p)]).ndim >= 2 for p in decay["params"])
    assert not any("ln_" in names[id(p)] or "embedding" in names[id(p)] for p in decay["params"])
