"""recall@k with ties: the documented stable rule (equal similarities ranked by column index), checked against a
direct count, and independent of which other k are requested (`torch.topk` keeps no order among equal values)."""

from __future__ import annotations

import pytest
import torch

from lightning_diffusion.clip.retrieval import recall_at_k


def reference_recall(similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                     k: int) -> float:
    """The rule as the docstring states it: rank(c) = #{j: s_j > s_c} + #{j < c: s_j == s_c}; a hit if any
    column of the query's id has rank < k."""
    hits = 0
    for row, query in zip(similarity.tolist(), query_ids.tolist()):
        ranks = [sum(s > row[c] for s in row) + sum(row[j] == row[c] for j in range(c))
                 for c, gallery in enumerate(gallery_ids.tolist()) if gallery == query]
        hits += bool(ranks) and min(ranks) < k
    return hits / len(query_ids)


def test_all_equal_scores_rank_columns_in_order() -> None:
    similarity = torch.ones(4, 40)
    gallery = torch.arange(40)
    assert recall_at_k(similarity, torch.tensor([0, 1, 2, 39]), gallery, ks=(1, 2, 3, 39, 40)) == {
        1: 0.25, 2: 0.5, 3: 0.75, 39: 0.75, 40: 1.0}
    # every row's match sits in column 28, behind 28 equal columns: never in the top 1, whatever else is asked
    late = torch.full((4,), 28)
    assert recall_at_k(similarity, late, gallery, ks=(1,))[1] == 0.0
    assert recall_at_k(similarity, late, gallery, ks=(1, 40))[1] == 0.0
    assert recall_at_k(similarity, late, gallery, ks=(28, 29)) == {28: 0.0, 29: 1.0}


@pytest.mark.parametrize("seed", range(4))
def test_tied_integer_scores_follow_the_rule_for_every_set_of_k(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    similarity = torch.randint(0, 3, (24, 30), generator=g).float()  # many ties in every row
    query_ids = torch.randint(0, 12, (24,), generator=g)
    gallery_ids = torch.randint(0, 12, (30,), generator=g)
    for ks in ((1,), (1, 5), (1, 5, 10), (1, 30), (30, 10, 5, 1), (3, 50)):
        result = recall_at_k(similarity, query_ids, gallery_ids, ks=ks)
        assert result == {k: pytest.approx(reference_recall(similarity, query_ids, gallery_ids, k)) for k in ks}
    alone = {k: recall_at_k(similarity, query_ids, gallery_ids, ks=(k,))[k] for k in (1, 5, 10)}
    assert recall_at_k(similarity, query_ids, gallery_ids, ks=(1, 5, 10, 30)) == {**alone, 30: pytest.approx(
        reference_recall(similarity, query_ids, gallery_ids, 30))}
