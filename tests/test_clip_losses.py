"""CLIP/SigLIP losses: equal to float64 references written here, and gathered across 2 ranks equal to 1 rank.

What the 2-rank test compares: each rank r holds half of a global batch and computes open_clip's per-rank loss
L_r (local rows against the features gathered from both ranks, gradients flowing back through the gather).
DDP then averages parameter gradients over ranks, so the update follows grad (1/W) sum_r L_r. With equal halves,
(1/W) sum_r L_r is exactly the single-process loss L on the concatenated batch, hence:
  mean_r L_r == L   and   mean_r grad L_r == grad L   (all parameters, including logit scale and bias).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_diffusion.clip.losses import make_contrastive_loss
from lightning_diffusion.errors import UserError

N, D_IN, D = 12, 10, 6


def clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean of the two cross-entropies with the diagonal as targets, written out in float64."""
    logits = scale * img.double() @ txt.double().T
    diag = logits.diagonal()
    image_to_text = (torch.logsumexp(logits, dim=1) - diag).mean()
    text_to_image = (torch.logsumexp(logits, dim=0) - diag).mean()
    return (image_to_text + text_to_image) / 2


def siglip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """-1/n sum_ij log sigmoid(z_ij (t s_ij + b)), z = +1 on the diagonal and -1 elsewhere (SigLIP paper, eq. 1)."""
    logits = scale * img.double() @ txt.double().T + bias
    z = 2 * torch.eye(len(img), dtype=torch.float64) - 1
    log_sigmoid = -torch.log1p(torch.exp(-z * logits))
    return -log_sigmoid.sum() / len(img)


def _features(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=-1), F.normalize(torch.randn(n, D, generator=g), dim=-1)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_float64_reference(scale: float) -> None:
    img, txt = _features()
    loss = make_contrastive_loss("clip")(img, txt, torch.tensor(scale))
    torch.testing.assert_close(loss.double(), clip_reference(img, txt, scale), rtol=1e-6, atol=1e-6)
    loss64 = make_contrastive_loss("clip")(img.double(), txt.double(), torch.tensor(scale, dtype=torch.float64))
    torch.testing.assert_close(loss64, clip_reference(img, txt, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("scale", "bias"), [(10.0, -10.0), (1.0, 0.0), (30.0, -3.0)])
def test_siglip_loss_matches_float64_reference(scale: float, bias: float) -> None:
    img, txt = _features(1)
    loss = make_contrastive_loss("siglip")(img, txt, torch.tensor(scale), torch.tensor(bias))
    torch.testing.assert_close(loss.double(), siglip_reference(img, txt, scale, bias), rtol=1e-6, atol=1e-6)


def test_unknown_loss_is_a_user_error() -> None:
    with pytest.raises(UserError, match="loss 'triplet'"):
        make_contrastive_loss("triplet")  # type: ignore[arg-type]


class _Towers(torch.nn.Module):
    """Two linear 'towers' and the logit parameters: enough to check gradients through the gather."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.image = torch.nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.text = torch.nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07) if kind == "clip" else math.log(10.0),
                                                           dtype=torch.float64))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64)) if kind == "siglip" else None

    def loss(self, x_img: torch.Tensor, x_txt: torch.Tensor, loss_fn: torch.nn.Module) -> torch.Tensor:
        img = F.normalize(x_img @ self.image, dim=-1)
        txt = F.normalize(x_txt @ self.text, dim=-1)
        return loss_fn(img, txt, self.logit_scale.exp(), self.logit_bias)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(N, D_IN, generator=g, dtype=torch.float64) for _ in range(2))


KINDS = ("clip", "siglip")


def _rank_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=world)
    try:
        x_img, x_txt = _inputs()
        rows = slice(rank * N // world, (rank + 1) * N // world)
        results = {}
        for kind in KINDS:
            towers = _Towers(kind)
            local = towers.loss(x_img[rows], x_txt[rows], make_contrastive_loss(kind, rank=rank, world_size=world))
            local.backward()
            mean_loss = local.detach().clone()
            dist.all_reduce(mean_loss)  # what DDP does to the gradients: sum, then divide by the world size
            grads = {}
            for name, param in towers.named_parameters():
                dist.all_reduce(param.grad)
                grads[name] = param.grad / world
            results[kind] = {"local": local.item(), "mean": (mean_loss / world).item(), "grads": grads}
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    """Run both losses once on 2 gloo ranks. Spawned, not forked: a fork after OpenMP has run can hang."""
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_rank_worker, args=(2, str(folder)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_rank_gathered_loss_and_gradients_equal_one_rank(kind: str, two_rank_results: list[dict]) -> None:
    world = len(two_rank_results)
    x_img, x_txt = _inputs()
    towers = _Towers(kind)
    global_loss = towers.loss(x_img, x_txt, make_contrastive_loss(kind))
    global_loss.backward()

    for rank in range(world):
        result = two_rank_results[rank][kind]
        assert result["mean"] == pytest.approx(global_loss.item(), abs=1e-10)
        for name, param in towers.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-5, atol=1e-5)
    # The per-rank losses themselves are not the global loss (only their mean is): the test is not vacuous.
    assert abs(two_rank_results[0][kind]["local"] - global_loss.item()) > 1e-6
    # Without the gather (each rank alone on its half) the loss would differ: the comparison can fail.
    half = N // world
    alone = sum(towers.loss(x_img[r * half:(r + 1) * half], x_txt[r * half:(r + 1) * half],
                            make_contrastive_loss(kind)).item() for r in range(world)) / world
    assert abs(alone - global_loss.item()) > 1e-3
