"""Whole-image inference for networks with a fixed input size: MONAI's sliding
window, with the image's own text given to every window.

The patch protocol (``data.patches``) trains on ``img_size``² crops of images kept
at ``data.scale`` of their original size and predicts the whole image by sliding
an ``img_size``² window over it. A text-guided network takes the image's text with
each window; the text still describes the whole image, so position words
("upper left lung") are only roughly right for a window (a known limit of the
patch protocol, which pathology tiles such as MoNuSeg do not have: their texts
count and describe nuclei, they do not place them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference

BLEND_MODES = ("gaussian", "constant")


def sliding_window_logits(forward: Callable[..., torch.Tensor],
                          images: torch.Tensor, tokens: torch.Tensor | None, roi: int | tuple[int, int], *,
                          sw_batch_size: int = 4, overlap: float = 0.25, mode: str = "gaussian",
                          domain: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of whole images from ``roi`` windows (an int S: S x S, or ``(h, w)``).

    Args:
        forward: ``forward(windows [W, C, roi, roi], tokens [W, ...] | None) -> [W, K, roi, roi]``
            (with ``domain``: ``forward(windows, tokens, domain [W])``).
        images: ``[B, C, H, W]``; any H, W (smaller than ``roi`` is zero-padded, then cropped back).
        tokens: ``[B, ...]`` text features of each image, or None; each window gets its
            image's row (windows of different images are never mixed in one call).
        roi: the window side, the network's input size.
        sw_batch_size: windows per forward call.
        overlap: fraction of a window shared with its neighbour.
        mode: ``gaussian`` (windows weighted towards their centre, MONAI's default
            for segmentation, which hides seams) or ``constant`` (plain average).
        domain: ``[B]`` domain index of each image (composite data), or None; each
            window gets its image's.

    Returns:
        ``[B, K, H, W]``: each pixel is the weighted mean of the windows covering it,
        so a window that covers the whole image gives exactly one forward pass.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"data.window_blend must be one of {BLEND_MODES}, got {mode!r}")
    roi_hw = (roi, roi) if isinstance(roi, int) else tuple(roi)
    out = []
    for b in range(len(images)):
        row = None if tokens is None else tokens[b:b + 1]
        dom = None if domain is None else domain[b:b + 1]

        def predictor(windows: torch.Tensor, row=row, dom=dom) -> torch.Tensor:
            t = None if row is None else row.expand(len(windows), *row.shape[1:])
            return forward(windows, t) if dom is None else forward(windows, t, dom.expand(len(windows)))

        out.append(sliding_window_inference(images[b:b + 1], roi_hw, sw_batch_size, predictor,
                                            overlap=overlap, mode=mode))
    return torch.cat(out)
