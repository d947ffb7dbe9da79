"""Retrieval metrics over a similarity matrix: recall@k both ways and matched vs unmatched cosine.

Recall@k here is the hit rate used in CLIP papers: a query counts if any of its k nearest gallery items is a
correct match. Correct means "same group id": with one caption per image the ids are the row indices; on the
emoji data several images share a caption (skin-tone variants), so the ids are caption hashes and retrieving
any image with the query's caption is correct.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """Stable int64 ids of captions (equal strings, equal ids; the same on every rank and run)."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
         for c in captions],
        dtype=torch.int64,
    )


def recall_at_k(similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries (rows) with a gallery item (column) of the same id among their top-k similarities.

    Tie rule (stable): each row is ranked by descending similarity, equal similarities by ascending column index,
    so a column's rank is ``#{j: s_j > s_c} + #{j < c: s_j == s_c}``. The ranking is computed once for the whole
    row, so recall@k does not depend on which other k are asked for (`torch.topk` gives no order among equal
    values). k larger than the gallery is clipped.
    """
    if similarity.shape != (len(query_ids), len(gallery_ids)):
        raise ValueError(
            f"similarity {tuple(similarity.shape)} does not match {len(query_ids)} x {len(gallery_ids)} ids")
    order = similarity.sort(dim=1, descending=True, stable=True).indices
    hits = gallery_ids.to(order.device)[order] == query_ids.to(order.device)[:, None]
    columns = similarity.shape[1]
    first_hit = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), torch.full_like(order[:, 0], columns))
    return {k: int((first_hit < min(k, columns)).sum()) / len(first_hit) for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ids: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k, and the mean cosine of matched and of unmatched pairs.

    Features are L2-normalised rows, one image and one caption per row; `ids` group rows with equal captions.
    """
    similarity = image_features.float() @ text_features.float().T
    metrics = {f"i2t_recall@{k}": v for k, v in recall_at_k(similarity, ids, ids, ks).items()}
    metrics |= {f"t2i_recall@{k}": v for k, v in recall_at_k(similarity.T, ids, ids, ks).items()}
    same = ids[:, None].to(similarity.device) == ids[None, :].to(similarity.device)
    metrics["cosine_matched"] = similarity.diagonal().mean().item()
    metrics["cosine_unmatched"] = similarity[~same].mean().item() if (~same).any() else float("nan")
    return metrics
