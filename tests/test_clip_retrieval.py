"""Retrieval recall@k and cosine summaries: exact values on constructed matrices, torchmetrics as an oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalHitRate

from lightning_diffusion.clip.retrieval import caption_ids, recall_at_k, retrieval_metrics


def test_recall_on_a_constructed_matrix() -> None:
    # Rank of the correct column (the diagonal) in each row: 1st, 2nd, 3rd, 4th, 5th.
    similarity = torch.tensor([
        [9.0, 1.0, 2.0, 3.0, 4.0],
        [5.0, 4.0, 0.0, 1.0, 2.0],
        [5.0, 4.0, 3.0, 1.0, 2.0],
        [5.0, 4.0, 6.0, 3.0, 2.0],
        [5.0, 4.0, 6.0, 7.0, 3.0],
    ])
    ids = torch.arange(5)
    assert recall_at_k(similarity, ids, ids, ks=(1, 2, 3, 4, 5, 10)) == {
        1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 1.0, 10: 1.0}


def test_recall_counts_any_item_of_the_same_caption() -> None:
    # Rows 0 and 1 share a caption: row 1's best column is 0, which is correct for it.
    similarity = torch.tensor([[1.0, 0.9, 0.0], [0.9, 0.8, 0.0], [0.0, 0.5, 0.4]])
    ids = torch.tensor([7, 7, 3])
    assert recall_at_k(similarity, ids, ids, ks=(1, 2)) == pytest.approx({1: 2 / 3, 2: 1.0})
    unique = torch.arange(3)
    assert recall_at_k(similarity, unique, unique, ks=(1, 2)) == pytest.approx({1: 1 / 3, 2: 1.0})


@pytest.mark.parametrize("seed", range(3))
def test_recall_equals_torchmetrics_hit_rate(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    similarity = torch.randn(40, 40, generator=g)
    ids = torch.randint(0, 25, (40,), generator=g)
    ours = recall_at_k(similarity, ids, ids, ks=(1, 5, 10))
    relevant = ids[:, None] == ids[None, :]
    queries = torch.arange(40)[:, None].expand(40, 40)
    for k in (1, 5, 10):
        oracle = RetrievalHitRate(top_k=k)(similarity.flatten(), relevant.flatten(), indexes=queries.flatten())
        assert ours[k] == pytest.approx(oracle.item(), abs=1e-6)


def test_retrieval_metrics_both_directions_and_cosines() -> None:
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    ids = torch.arange(3)
    metrics = retrieval_metrics(image, text, ids, ks=(1, 3))
    similarity = image @ text.T
    # Image 0 -> text 0 (correct); image 1 -> text 2 (wrong); image 2 -> text 1 (wrong).
    assert metrics["i2t_recall@1"] == pytest.approx(1 / 3)
    # Text 0 -> image 0 (correct); text 1 -> image 2 (wrong); text 2 -> image 1 (wrong).
    assert metrics["t2i_recall@1"] == pytest.approx(1 / 3)
    assert metrics["i2t_recall@3"] == metrics["t2i_recall@3"] == 1.0
    assert metrics["cosine_matched"] == pytest.approx(similarity.diagonal().mean().item())
    off_diagonal = similarity[~torch.eye(3, dtype=torch.bool)]
    assert metrics["cosine_unmatched"] == pytest.approx(off_diagonal.mean().item())


def test_caption_ids_are_stable_and_equal_for_equal_captions() -> None:
    ids = caption_ids(["a koala", "a cat", "a koala"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and ids[0] != ids[1]
    assert torch.equal(ids, caption_ids(["a koala", "a cat", "a koala"]))
