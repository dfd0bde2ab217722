"""DuSSS semantic similarity supervision (SSS) and dual contrastive losses, as pure tensor functions.

One function per equation of the DuSSS paper (``../shared/papers/dusss.txt``;
numbers as printed there):

- :func:`wasserstein2` / :func:`pairwise_wasserstein2`:
  ``D_2W = ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2`` (Eq. 1);
- :func:`uncertainty_distance`: ``D_u = a * D_2W + b`` (Eq. 2);
- :func:`semantic_distance` / :func:`pairwise_semantic_distance`:
  ``D_s = ||s1 - s2||_2`` (the text before Eq. 1);
- :func:`relative_uncertainty`: ``D_u / D_s`` (Eq. 3);
- :func:`sss_weight`: ``D_SSS = exp(-lambda * D_u / D_s)`` (Eq. 4), and
  :func:`pairwise_sss` chaining Eq. 1-4 for two sets of embeddings;
- :func:`uncertainty_cosine`: ``sim^ = 1 - (1 - sim) * D_SSS`` (Eq. 5);
- :func:`info_nce`: SSS-weighted symmetric InfoNCE, the CMC and IMC terms (Eq. 6-9);
- :func:`text_guided_features` / :func:`text_guided_loss`: the text-guided visual
  feature ``v_f^t`` and the text-guided loss L_tg (Eq. 11).

The constants ``a = 1/200``, ``b = 4`` and ``lambda = 1/5`` are the official
code's (``../shared/notes/reference-implementations.md``) and appear here only
as keyword defaults. Nothing in this module holds state; the learnable
temperature (initialised to 0.07) is a parameter of the model and is passed in.

Choices where the paper is silent or ambiguous:

- **D_s** is the Euclidean distance between the *L2-normalised projected*
  embeddings, the same vectors whose cosine is ``sim`` in Eq. 5. So
  ``D_s = sqrt(2 - 2 sim)`` lies in ``[0, 2]`` and the relative uncertainty
  ``D_u / D_s`` is at least ``b / 2``. D_s is clamped to ``eps`` (default
  ``1e-6``) before dividing: as two embeddings meet, ``D_SSS -> exp(-huge) = 0``
  exactly and ``sim^ -> 1``, with finite (zero) gradients instead of NaN.
- **Where SSS enters InfoNCE**: every logit of the ``N x N`` matrix, positive and
  negative alike, is the uncertainty cosine ``sim^_ij / tau`` of Eq. 5 with the
  pair's own ``D_SSS_ij``, in *each* contrastive term: image-text (Eq. 6-8) and
  image-image / text-text across the two views (Eq. 9). The official code
  weighted only the cross-modal term; the paper weights all of them.
- **Gradients through D_SSS** are kept: they are the only signal that trains
  the Gaussian heads (nothing else in the paper's loss reads ``mu``/``sigma``).
  A caller that wants SSS as a fixed re-weighting can pass ``weights.detach()``.
- **Duplicated texts** (many images share one description) are *positives*, not
  negatives: with a ``positives`` mask, each row's loss is
  ``-log(sum_{p in P(i)} softmax_i(p))`` (the probability mass on all of the
  anchor's positives). Without duplicates this is exactly the usual
  cross-entropy against the diagonal; with an exact duplicate column it equals
  collapsing the duplicates into one class, so a perfect model reaches zero
  loss instead of being capped at ``log 2`` and pushed to separate identical
  texts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medtextseg.config import SSS_A, SSS_B, SSS_LAMBDA, TEMPERATURE_INIT

__all__ = [
    "info_nce",
    "pairwise_semantic_distance",
    "pairwise_sss",
    "pairwise_wasserstein2",
    "relative_uncertainty",
    "same_text_positives",
    "semantic_distance",
    "sss_weight",
    "text_guided_features",
    "text_guided_loss",
    "uncertainty_cosine",
    "uncertainty_distance",
    "wasserstein2",
]

#: Default clamp of D_s (see the module docstring).
DEFAULT_EPS = 1e-6


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        got = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        raise ValueError(f"expected tensors of one shape [..., D], got {got}")


def _check_rows(what: str, x: Tensor, y: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{what}: expected [N, D] and [M, D] with the same D, "
            f"got {list(x.shape)} and {list(y.shape)}"
        )


def _pairwise_sq_dist(x: Tensor, y: Tensor) -> Tensor:
    """``||x_i - y_j||^2`` for ``x [N, D]``, ``y [M, D]`` -> ``[N, M]``.

    The expanded form keeps memory at ``N*M`` (a broadcast difference would
    need ``N*M*D``) and, unlike ``torch.cdist``, has no square root to blow up
    the gradient at zero; rounding can make it slightly negative, hence the clamp.
    """
    sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(0) - 2.0 * (x @ y.T)
    return sq.clamp_min(0.0)


def wasserstein2(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance of diagonal Gaussians, DuSSS Eq. 1, row by row.

    ``D_2W = ||mu1 - mu2||_2^2 + ||sigma1 - sigma2||_2^2`` (exact for diagonal
    covariances, the closed form the paper uses).

    Args:
        mu1, sigma1, mu2, sigma2: ``[..., D]``, all the same shape; ``sigma`` is
            the standard deviation (``exp`` of the model's log-sigma), not the variance.

    Returns:
        ``[...]``: one distance per row (the last dimension is summed).

    Raises:
        ValueError: the shapes differ.
    """
    _check_same_shape(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2)
    return (mu1 - mu2).pow(2).sum(-1) + (sigma1 - sigma2).pow(2).sum(-1)


def pairwise_wasserstein2(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """DuSSS Eq. 1 for every pair of rows: ``[N, D] x [M, D] -> [N, M]``.

    Entry ``(i, j)`` is ``wasserstein2(mu1[i], sigma1[i], mu2[j], sigma2[j])``.

    Args:
        mu1, sigma1: ``[N, D]`` means and standard deviations of the first set.
        mu2, sigma2: ``[M, D]`` of the second set.

    Raises:
        ValueError: wrong ranks or widths.
    """
    _check_same_shape(mu1=mu1, sigma1=sigma1)
    _check_same_shape(mu2=mu2, sigma2=sigma2)
    _check_rows("pairwise_wasserstein2", mu1, mu2)
    return _pairwise_sq_dist(mu1, mu2) + _pairwise_sq_dist(sigma1, sigma2)


def uncertainty_distance(d2w: Tensor, a: float = SSS_A, b: float = SSS_B) -> Tensor:
    """Uncertainty level, DuSSS Eq. 2: ``D_u = a * D_2W + b``, elementwise, any shape.

    Args:
        d2w: squared 2-Wasserstein distances (:func:`wasserstein2` or
            :func:`pairwise_wasserstein2`) of the two [CLS] Gaussians.
        a: positive scale of the uncertainty (official value 1/200).
        b: offset (official value 4).
    """
    if a <= 0:
        raise ValueError(f"a must be positive (it scales the uncertainty), got {a}")
    return a * d2w + b


def semantic_distance(s1: Tensor, s2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Semantic distance ``D_s = ||s1 - s2||_2`` (DuSSS text before Eq. 1), row by row.

    Pass the L2-normalised projected embeddings (module docstring). The result
    is at least ``eps``: the square root is taken of ``max(||s1 - s2||^2, eps^2)``
    so its gradient stays finite when the embeddings coincide.

    Args:
        s1, s2: ``[..., D]``, the same shape.

    Returns:
        ``[...]``.
    """
    _check_same_shape(s1=s1, s2=s2)
    return (s1 - s2).pow(2).sum(-1).clamp_min(eps * eps).sqrt()


def pairwise_semantic_distance(s1: Tensor, s2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """:func:`semantic_distance` for every pair of rows: ``[N, D] x [M, D] -> [N, M]``, ``>= eps``."""
    _check_rows("pairwise_semantic_distance", s1, s2)
    return _pairwise_sq_dist(s1, s2).clamp_min(eps * eps).sqrt()


def relative_uncertainty(d_u: Tensor, d_s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Relative uncertainty, DuSSS Eq. 3: ``D_u / max(D_s, eps)``, elementwise (broadcasts)."""
    if eps <= 0:
        raise ValueError(f"eps must be positive (it keeps D_u / D_s finite), got {eps}")
    return d_u / d_s.clamp_min(eps)


def sss_weight(d_u: Tensor, d_s: Tensor, lam: float = SSS_LAMBDA, eps: float = DEFAULT_EPS) -> Tensor:
    """Semantic similarity supervision, DuSSS Eq. 4: ``D_SSS = exp(-lam * D_u / D_s)``.

    Elementwise (broadcasts). ``D_s`` is clamped to ``eps`` (Eq. 3,
    :func:`relative_uncertainty`), so ``D_s -> 0`` gives ``D_SSS = 0`` (not NaN)
    and a zero gradient; the result lies in ``[0, 1)`` since ``D_u >= b > 0``.

    Args:
        d_u: uncertainty levels (:func:`uncertainty_distance`).
        d_s: semantic distances (:func:`semantic_distance`).
        lam: constraint degree lambda (official value 1/5).
        eps: smallest D_s divided by.
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    return torch.exp(-lam * relative_uncertainty(d_u, d_s, eps))


def uncertainty_cosine(sim: Tensor, d_sss: Tensor) -> Tensor:
    """Uncertainty cosine similarity, DuSSS Eq. 5: ``sim^ = 1 - (1 - sim) * D_SSS``.

    Elementwise (broadcasts). With ``D_SSS`` in ``[0, 1]``, ``sim^`` lies in
    ``[sim, 1]``: the more uncertain a pair (smaller ``D_SSS``), the closer its
    similarity is pulled towards 1 (paper Eq. 18).

    Args:
        sim: cosine similarities, e.g. ``[N, N]``.
        d_sss: :func:`sss_weight` of the same pairs.
    """
    return 1.0 - (1.0 - sim) * d_sss


def pairwise_sss(
    emb1: Tensor,
    mu1: Tensor,
    sigma1: Tensor,
    emb2: Tensor,
    mu2: Tensor,
    sigma2: Tensor,
    *,
    a: float = SSS_A,
    b: float = SSS_B,
    lam: float = SSS_LAMBDA,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """``D_SSS`` (Eq. 1-4) of every pair across two sets: ``[N, M]``, ready for :func:`info_nce`.

    Args:
        emb1: ``[N, E]`` L2-normalised embeddings of the first set (for D_s).
        mu1, sigma1: ``[N, G]`` Gaussian mean and standard deviation of its [CLS].
        emb2, mu2, sigma2: the same for the second set (``M`` rows).
        a, b, lam, eps: see :func:`uncertainty_distance` and :func:`sss_weight`.

    Returns:
        ``[N, M]`` weights in ``[0, 1)``; entry ``(i, j)`` compares ``i`` of the
        first set with ``j`` of the second.
    """
    d_u = uncertainty_distance(pairwise_wasserstein2(mu1, sigma1, mu2, sigma2), a=a, b=b)
    d_s = pairwise_semantic_distance(emb1, emb2, eps=eps)
    return sss_weight(d_u, d_s, lam=lam, eps=eps)


def same_text_positives(groups: Tensor) -> Tensor:
    """``[N, N]`` bool mask, True where samples ``i`` and ``j`` carry the same text.

    Args:
        groups: ``[N]`` integer id of each sample's text (e.g. its index among
            the batch's unique texts), or ``[N, L]`` token ids: equal ids, or
            equal rows, mean identical texts (as the model sees them).
    """
    if groups.ndim == 1:
        return groups.unsqueeze(0) == groups.unsqueeze(1)
    if groups.ndim == 2:
        return (groups.unsqueeze(0) == groups.unsqueeze(1)).all(dim=-1)
    raise ValueError(f"expected groups of shape [N] or [N, L], got {list(groups.shape)}")


def _positive_mass_nll(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of ``-log sum_{p in P(i)} softmax(logits_i)_p``."""
    masked = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)).mean()


def info_nce(
    a: Tensor,
    b: Tensor,
    weights: Tensor | None = None,
    temperature: float | Tensor = TEMPERATURE_INIT,
    *,
    positives: Tensor | None = None,
    symmetric: bool = True,
) -> Tensor:
    """SSS-weighted InfoNCE between paired rows, DuSSS Eq. 6-9.

    Row ``i`` of ``a`` and row ``i`` of ``b`` are a positive pair (an image and
    its text, or two views of one sample); every other row of the batch is a
    negative unless ``positives`` says otherwise. The logit of pair ``(i, j)`` is
    ``sim^_ij / tau`` (Eq. 5) with ``sim_ij = cos(a_i, b_j)``, or plain
    ``sim_ij / tau`` when ``weights`` is None. As in van den Oord et al. the
    positive is part of the softmax denominator.

    Building the DuSSS losses (``w(x, y) = pairwise_sss(...)`` of the two sets)::

        L_cmc = info_nce(img, txt, w(img, txt), tau)                      # Eq. 6-8
        L_imc = (info_nce(img1, img2, w(img1, img2), tau)
                 + info_nce(txt1, txt2, w(txt1, txt2), tau)) / 2          # Eq. 9

    The image-to-text direction (Eq. 6) is the row-wise softmax, text-to-image
    (Eq. 7) the column-wise one, and ``symmetric=True`` averages the two (Eq. 8).
    Eq. 9 writes one direction per modality; with ``symmetric=True`` each IMC
    term is averaged over both views' directions too (the two views are
    interchangeable, so this only halves the variance).

    Args:
        a: ``[N, D]`` embeddings (L2-normalised here again; a no-op when they already are).
        b: ``[N, D]`` embeddings of the paired rows.
        weights: ``[N, N]`` ``D_SSS`` of every ``(a_i, b_j)`` pair (:func:`pairwise_sss`),
            or None for plain InfoNCE. The ``b -> a`` direction uses its transpose.
        temperature: ``tau > 0``, float or a scalar tensor (the model's learnable one).
        positives: optional ``[N, N]`` bool, True where ``(a_i, b_j)`` is also a
            positive pair (e.g. :func:`same_text_positives`); the diagonal is always
            positive. Each row's loss is ``-log`` of the softmax mass on all its
            positives (module docstring).
        symmetric: average both directions (True) or return ``a -> b`` only.

    Returns:
        Scalar loss, the mean over the ``N`` anchors (and the two directions).

    Raises:
        ValueError: shapes that do not match ``[N, D]`` / ``[N, N]``, or ``tau <= 0``.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"expected a and b of one shape [N, D], got {list(a.shape)} and {list(b.shape)}"
        )
    n = a.shape[0]
    for name, m in (("weights", weights), ("positives", positives)):
        if m is not None and tuple(m.shape) != (n, n):
            raise ValueError(f"expected {name} of shape [{n}, {n}], got {list(m.shape)}")
    if not isinstance(temperature, Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    if weights is not None:
        sim = uncertainty_cosine(sim, weights)
    logits = sim / temperature
    pos = torch.eye(n, dtype=torch.bool, device=a.device)
    if positives is not None:
        pos = pos | positives.to(device=a.device, dtype=torch.bool)
    loss = _positive_mass_nll(logits, pos)
    if not symmetric:
        return loss
    return 0.5 * (loss + _positive_mass_nll(logits.T, pos.T))


def text_guided_features(dense: Tensor, txt: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """The text-guided visual feature ``v_f^t`` of Eq. 11: dense features pooled under the text mask.

    Eq. 11 compares ``v_f^t`` with the text but does not define it; here it is the
    average of the pixel features ``v_f`` (Eq. 10) weighted by the image's own
    text-guided mask ``m = sigmoid(t^T v_f)``::

        v_f^t = sum_p m_p v_p / max(sum_p m_p, eps)

    so it describes the region the text selects, and L_tg pulls that region's
    features towards the text and away from the other texts of the batch (it
    "suppresses irrelevant text-guided mask generation": a mask that also covers
    what another text describes makes ``v_f^t`` look like that text too).

    Args:
        dense: ``[B, E, h, w]`` decoder output ``v_f`` (not normalised).
        txt: ``[B, E]`` L2-normalised text embeddings; row ``i`` is image ``i``'s own text.

    Returns:
        ``[B, E]`` pooled features (not normalised; :func:`info_nce` normalises).
    """
    if dense.ndim != 4 or txt.ndim != 2 or dense.shape[:2] != txt.shape:
        raise ValueError(
            f"expected dense [B, E, h, w] and txt [B, E] of one B and E, got {list(dense.shape)} "
            f"and {list(txt.shape)}"
        )
    mask = torch.sigmoid(torch.einsum("be,behw->bhw", txt, dense))
    pooled = torch.einsum("bhw,behw->be", mask, dense)
    return pooled / mask.sum(dim=(1, 2)).clamp_min(eps).unsqueeze(1)


def text_guided_loss(
    dense: Tensor,
    txt: Tensor,
    temperature: float | Tensor = TEMPERATURE_INIT,
    *,
    positives: Tensor | None = None,
) -> Tensor:
    """Text-guided loss L_tg, DuSSS Eq. 11: symmetric InfoNCE of ``v_f^t`` and the text.

    ``L_tg = 1/2 [-log softmax_k sim(v_i^t, t_k)/tau at k = i] + 1/2 [-log softmax_k
    sim(t_i, v_k^t)/tau at k = i]``, averaged over the batch, with ``v^t`` from
    :func:`text_guided_features` and the *plain* cosine ``sim`` (Eq. 11 writes
    ``sim``, not the uncertainty cosine of Eq. 5). The ``K`` negatives are the
    other texts (first term) and the other images' text-guided features (second).

    Args:
        dense: ``[B, E, h, w]`` pixel features ``v_f``.
        txt: ``[B, E]`` the images' own text embeddings.
        temperature: ``tau`` (the model's learnable one).
        positives: optional ``[B, B]`` bool, pairs that carry the same text
            (:func:`same_text_positives`), counted as positives, not negatives.

    Returns:
        Scalar loss.
    """
    return info_nce(text_guided_features(dense, txt), txt, None, temperature, positives=positives)
