"""Frequency space exchange of TextMoE's content regularisation (``papers/textmoe.txt``,
§2.3, Eq. 6), vectorised over a batch with ``torch.fft``.

Eq. 6 writes the exchange only as ``x_{i,f} = F^-1(F(x_j))`` and says the result
"combines the content of x_i with the style of x_j from a different modality". Here
that is the amplitude exchange of the *centred* spectrum (as in FDA, Yang & Soatto
2020): per image and channel, with ``F = fft2`` and signed frequencies
``(k_y, k_x)`` (DC at 0, the centre of the ``fftshift``-ed spectrum),

    band B = {(k_y, k_x): |k_y| < band · H / 2 and |k_x| < band · W / 2}
    A'     = |F(x_j)| on B,  |F(x_i)| elsewhere        (style: x_j's low-frequency amplitude)
    x_{i,f} = Re F^-1(A' · exp(i · angle(F(x_i))))      (content: x_i's phase everywhere,
                                                         and its high frequencies whole)

``band`` is the fraction of the spectrum's side that the centred square spans (0:
nothing is exchanged, the identity; 1: every amplitude but the Nyquist row/column).
The band is symmetric about DC, so ``A'`` stays even and the phase odd, and the
result is real up to rounding (the imaginary part is dropped). The output is not
clamped to [0, 1]: the exchange is exact, and the networks take any float input.

The official code swapped a small disc of the *unshifted* spectrum, i.e. around the
Nyquist corner, which exchanges almost nothing (``notes/reference-implementations.md``).

Partners (:func:`exchange_partners`): ``x_j`` comes from another domain of the batch
where the batch has one (uniformly among those images), else from another image of
the batch: the images are put on one random cycle (a seeded permutation without fixed
points), so every image lends its style exactly once and never to itself (B > 1).
"""

from __future__ import annotations

import torch

__all__ = ["band_mask", "exchange_partners", "frequency_exchange"]


def band_mask(height: int, width: int, band: float, device=None) -> torch.Tensor:
    """``[H, W]`` bool: the centred low-frequency square ``|k_y| < band·H/2, |k_x| < band·W/2``,
    laid out like ``torch.fft.fft2``'s output (unshifted; the same set as a centred square
    of the ``fftshift``-ed spectrum)."""
    if not 0.0 <= band <= 1.0:
        raise ValueError(f"band must be a fraction of the spectrum side in [0, 1], got {band}")
    ky = torch.fft.fftfreq(height, device=device).abs()  # |k_y| / H
    kx = torch.fft.fftfreq(width, device=device).abs()
    return (ky[:, None] < band / 2) & (kx[None, :] < band / 2)


def frequency_exchange(images: torch.Tensor, partners: torch.Tensor, band: float) -> torch.Tensor:
    """Eq. 6: for every image ``x_i`` of ``images [B, C, H, W]``, the image with the
    low-frequency amplitude of ``x_j = images[partners[i]]`` and the phase and high
    frequencies of ``x_i`` (module docstring). ``partners``: LongTensor ``[B]``.

    Returns ``[B, C, H, W]`` float, same dtype as the input (computed in float32 at least)."""
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got {list(images.shape)}")
    if band == 0:
        return images.clone()
    h, w = images.shape[-2:]
    x = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    spec = torch.fft.fft2(x)  # over (H, W), per image and channel
    amp, phase = spec.abs(), spec.angle()
    mask = band_mask(h, w, band, images.device)
    mixed = torch.where(mask, amp[partners.to(images.device)], amp)
    out = torch.fft.ifft2(torch.polar(mixed, phase)).real
    return out.to(images.dtype)


def exchange_partners(batch: int, domain: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B]`` LongTensor: the style partner ``j`` of every image ``i`` (module docstring).

    ``domain``: ``[B]`` domain indices or ``None`` (one domain). Images with at least one
    image of another domain in the batch draw their partner uniformly among those; the
    others take the next image on a random cycle through the batch (never themselves
    when ``B > 1``; ``B = 1`` pairs the image with itself, an identity exchange).
    Random numbers come from ``generator`` (default: torch's global, seeded run stream),
    drawn on the CPU."""
    if batch < 1:
        return torch.zeros(0, dtype=torch.long)
    perm = torch.randperm(batch, generator=generator)
    cycle = torch.empty(batch, dtype=torch.long)
    cycle[perm] = perm.roll(-1)  # perm[k] -> perm[k + 1]: one cycle, no fixed point
    if domain is None:
        return cycle
    d = torch.as_tensor(domain).cpu().long()
    if d.shape != (batch,):
        raise ValueError(f"domain must be [B] = [{batch}], got {list(d.shape)}")
    other = d[:, None] != d[None, :]  # [B, B]: j is of another domain than i
    scores = torch.rand(batch, batch, generator=generator).masked_fill(~other, -1.0)
    cross = scores.argmax(dim=1)
    return torch.where(other.any(dim=1), cross, cycle)
