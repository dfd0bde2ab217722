"""Image-text retrieval recall when many images share one text (the VLM's selection metric).

The datasets of this toolkit describe many images with the same structured text
(QaTa has a few hundred distinct descriptions for thousands of images), so
retrieval is scored *by text*, never by sample index:

- **image -> text**: each image queries the split's *distinct* texts; a hit at
  ``k`` when the image's own text is among the ``k`` most similar.
- **text -> image**: each distinct text queries all images of the split; a hit at
  ``k`` when at least one of the ``k`` most similar images carries that text.

Ties are broken at random and the *expected* hit is reported, so a collapsed
model (every similarity equal) scores the chance level, not 1 (optimistic ties)
or 0 (pessimistic ties). With ``g`` negatives strictly above the best positive,
``e`` negatives tied with it and ``p`` positives at that score, the query hits at
``k`` with probability ``1 - C(e, m) / C(e + p, m)`` for ``m = k - g`` in
``[1, e]`` (0 when ``m <= 0``, 1 when ``m > e``).

The chance levels (a random ranking) are returned beside the figures:
``min(k, U) / U`` for image -> text among ``U`` texts, and for text -> image the
mean over texts of ``1 - C(N - n_t, k) / C(N, k)`` with ``n_t`` of the ``N``
images carrying text ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["retrieval_recall"]


def _miss_probability(e: int, p: int, m: int) -> float:
    """P(none of ``p`` tied positives lands in the first ``m`` places of ``e + p`` shuffled)."""
    out = 1.0
    for i in range(m):
        out *= (e - i) / (e + p - i)
    return out


def _expected_hits(scores: Tensor, positives: Tensor, k: int) -> Tensor:
    """``[Q, G]`` scores and positive mask -> ``[Q]`` expected hit at ``k`` (module docstring)."""
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    neg = ~positives
    g = ((scores > best) & neg).sum(1).tolist()
    e = ((scores == best) & neg).sum(1).tolist()
    p = ((scores == best) & positives).sum(1).tolist()
    out = []
    for gi, ei, pi in zip(g, e, p, strict=True):
        m = k - gi
        out.append(0.0 if m <= 0 else 1.0 if m > ei else 1.0 - _miss_probability(ei, pi, m))
    return torch.tensor(out, dtype=torch.float64)


def retrieval_recall(img_emb: Tensor, txt_emb: Tensor, text_of_image: Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict:
    """Recall at ``ks`` both ways, scored by text (module docstring).

    Args:
        img_emb: ``[N, E]`` image embeddings (cosine similarity: normalised here).
        txt_emb: ``[U, E]`` embeddings of the ``U`` distinct texts.
        text_of_image: ``[N]`` int, row of ``txt_emb`` carried by each image; every
            text must be carried by at least one image.
        ks: the cut-offs.

    Returns:
        ``{"i2t_r{k}", "t2i_r{k}" for k in ks, "r1" (mean of the two R@1 when 1 is in
        ks), "n_images", "n_texts", "chance": {same keys}}``, recalls as floats in [0, 1].

    Raises:
        ValueError: shapes that do not fit, or a text no image carries.
    """
    if img_emb.ndim != 2 or txt_emb.ndim != 2 or img_emb.shape[1] != txt_emb.shape[1]:
        raise ValueError(f"expected img_emb [N, E] and txt_emb [U, E], got {list(img_emb.shape)} "
                         f"and {list(txt_emb.shape)}")
    n, u = img_emb.shape[0], txt_emb.shape[0]
    t = torch.as_tensor(text_of_image, dtype=torch.long).cpu()
    if t.shape != (n,) or n == 0 or int(t.min()) < 0 or int(t.max()) >= u:
        raise ValueError(f"expected text_of_image [{n}] with values in [0, {u}), got {list(t.shape)}")
    counts = torch.bincount(t, minlength=u)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} of the {u} texts are carried by no image; "
                         "pass the distinct texts of these images only")
    sim = F.normalize(img_emb.float().cpu(), dim=-1) @ F.normalize(txt_emb.float().cpu(), dim=-1).T
    pos = F.one_hot(t, u).bool()  # [N, U]: image n carries text u
    out: dict = {"n_images": n, "n_texts": u}
    chance: dict = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(_expected_hits(sim, pos, k).mean())
        out[f"t2i_r{k}"] = float(_expected_hits(sim.T, pos.T, k).mean())
        chance[f"i2t_r{k}"] = min(k, u) / u
        chance[f"t2i_r{k}"] = float(sum(1.0 - (comb(n - c, k) / comb(n, k) if k <= n else 0.0)
                                        for c in counts.tolist()) / u)
    if 1 in ks:
        out["r1"] = 0.5 * (out["i2t_r1"] + out["t2i_r1"])
        chance["r1"] = 0.5 * (chance["i2t_r1"] + chance["t2i_r1"])
    out["chance"] = chance
    return out
