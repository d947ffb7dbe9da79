"""The conditional U-Net: shapes, zero-initialised residual branches, and every condition actually wired in."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from denoiser_support import one_thread

from lightning_diffusion.diffusion.attention import CrossAttention
from lightning_diffusion.diffusion.embeddings import sinusoidal_embedding
from lightning_diffusion.diffusion.unet import UNet

CONTEXT_DIM = 24


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def tiny_unet(**overrides: object) -> UNet:
    args = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                num_heads=2, context_dim=CONTEXT_DIM, pooled_dim=CONTEXT_DIM, num_classes=5, lowres_channels=3)
    args.update(overrides)
    return UNet(**args)


def randomized(unet: UNet, seed: int = 0) -> UNet:
    """Give the zero-initialised layers random weights, as training would, so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return unet.eval()


def inputs(batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[:, 5:] = False  # the last two tokens are padding
    return {
        "x": torch.randn(batch, 3, 16, 16, generator=generator),
        "t": torch.tensor([3.0, 400.0, 999.0][:batch]),
        "context": torch.randn(batch, 7, CONTEXT_DIM, generator=generator),
        "context_mask": mask,
        "pooled": torch.randn(batch, CONTEXT_DIM, generator=generator),
        "label": torch.tensor([0, 4, 5][:batch]),
        "lowres": torch.randn(batch, 3, 8, 8, generator=generator),
    }


def run(unet: UNet, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = dict(kwargs)
    with torch.no_grad():
        return unet(kwargs.pop("x"), kwargs.pop("t"), **kwargs)


def test_tiny_unet_is_small_and_starts_predicting_zero() -> None:
    unet = tiny_unet()
    assert sum(p.numel() for p in unet.parameters()) < 1_000_000
    out = run(unet, inputs())
    assert out.shape == (3, 3, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv
    block = unet.down[0][0]
    x = torch.randn(2, 16, 16, 16)
    assert torch.allclose(block(x, torch.randn(2, 64)), x)  # a fresh ResBlock is the identity around its skip


def test_changing_the_text_changes_the_output_but_padding_does_not() -> None:
    unet = randomized(tiny_unet())
    base = inputs()
    other_text = dict(base, context=base["context"].clone())
    other_text["context"][:, 1] = torch.randn(3, CONTEXT_DIM)  # (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(run(unet, base), run(unet, other_text), atol=1e-4)
    padding_changed = dict(base, context=base["context"].clone())
    padding_changed["context"][:, 5:] = 100.0  # masked-out positions
    torch.testing.assert_close(run(unet, base), run(unet, padding_changed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["label", "lowres", "pooled", "t"])
def test_each_condition_changes_the_output(key: str) -> None:
    unet = randomized(tiny_unet())
    base = inputs()
    changed = dict(base)
    if key == "label":
        changed["label"] = torch.tensor([1, 5, 0])
    elif key == "t":
        changed["t"] = base["t"] + 50
    else:
        changed[key] = base[key] + torch.randn_like(base[key])
    diff = (run(unet, base) - run(unet, changed)).flatten(1).abs().amax(dim=1)
    assert (diff > 1e-4).all()


def test_permuting_the_batch_permutes_the_output() -> None:
    unet = randomized(tiny_unet())
    base = inputs()
    order = torch.tensor([2, 0, 1])
    permuted = {key: value[order] for key, value in base.items()}
    torch.testing.assert_close(run(unet, permuted), run(unet, base)[order], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_output_and_gradients() -> None:
    plain = randomized(tiny_unet()).train()
    checkpointed = randomized(tiny_unet(gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    base = inputs()
    grads = []
    for unet in (plain, checkpointed):
        kwargs = dict(base)
        out = unet(kwargs.pop("x"), kwargs.pop("t"), **kwargs)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_unconditional_unet_and_missing_condition() -> None:
    unet = UNet(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
    assert run(unet, {"x": torch.randn(2, 3, 16, 16), "t": torch.tensor([1.0, 2.0])}).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="label"):
        run(tiny_unet(), {k: v for k, v in inputs().items() if k != "label"})


def test_cross_attention_matches_a_float64_softmax_reference() -> None:
    torch.manual_seed(0)
    layer = CrossAttention(channels=8, context_dim=6, heads=2).double()
    torch.nn.init.normal_(layer.proj_out.weight)
    x, context = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q = layer.to_q(layer.norm(x).flatten(2).transpose(1, 2)).reshape(2, 9, 2, 4).transpose(1, 2)
    k, v = (p.reshape(2, 5, 2, 4).transpose(1, 2) for p in layer.to_kv(layer.context_norm(context)).chunk(2, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)
    scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 8)
    expected = x + layer.proj_out(attended).transpose(1, 2).reshape(2, 8, 3, 3)
    torch.testing.assert_close(layer(x, context, mask), expected)


def test_sinusoidal_embedding_closed_form() -> None:
    t = torch.tensor([0.0, 1.0, 250.0])
    emb = sinusoidal_embedding(t, 8)
    freqs = 10_000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))


def test_film_with_group_norm_affine_matches_the_unfused_formula() -> None:
    block = randomized(tiny_unet()).down[0][0]
    with torch.no_grad():
        block.norm2.weight.normal_()
        block.norm2.bias.normal_()
    x, emb = torch.randn(2, 16, 16, 16), torch.randn(2, 64)
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    scale, shift = block.embed(torch.nn.functional.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale) + shift
    expected = x + block.conv2(torch.nn.functional.silu(h))
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)


def test_feed_forward_option_adds_zero_initialised_geglu_blocks() -> None:
    plain, with_ff = tiny_unet(), tiny_unet(feed_forward=True)
    ff_keys = set(with_ff.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(with_ff.state_dict()) and all(".feed_forward." in k for k in ff_keys)
    # one feed-forward per attention block (down at 8 px, middle, up at 8 px x 2), each 3 m C^2 + (2 m + 3) C, m = 4
    widths = [32, 32, 32, 32]
    extra = sum(p.numel() for p in with_ff.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(12 * c * c + 11 * c for c in widths)
    out = run(with_ff, inputs())
    assert out.shape == (3, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))
    block = with_ff.middle[1]
    x = torch.randn(2, 32, 8, 8)
    context = torch.randn(2, 7, CONTEXT_DIM)
    torch.testing.assert_close(block(x, context), x)  # fresh: every sublayer's output projection is zero
    randomized(with_ff)
    assert not torch.allclose(block.feed_forward(x), x)  # trained, the feed-forward changes the features


def test_channels_last_gives_the_same_outputs_and_gradients() -> None:
    plain = randomized(tiny_unet()).train()
    nhwc = tiny_unet(channels_last=True).train()
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    grads, outs = [], []
    for unet in (plain, nhwc):
        kwargs = dict(inputs())
        out = unet(kwargs.pop("x"), kwargs.pop("t"), **kwargs)
        assert out.is_contiguous()
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
