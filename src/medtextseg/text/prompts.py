"""Per-class text prompts of a structured description (PromptSSL Eq. 8: one prompt per class).

PromptSSL turns each class into a text prompt and matches it against dense image
features. The paper does not print its prompts; we choose **the class name with the
state the slice's own text gives it**, e.g. ``"L3 link"``, ``"L4/L5 exist"``,
``"T9 none"``, and ``"background"`` for class 0. Why: the name alone would make the
prompt of a class the same in every slice, so the prompt mask could not use what the
text says (which structures the slice shows, and how); the state carries it, and a
``none`` structure is absent from the slice by the text's grammar.

Two styles (``vlm.prompts``):

- ``spine``: descriptions in the MRSpineSeg grammar (``"T9 none, T910 none, T10 link,
  ..., S split"``, :mod:`medtextseg.data.synthetic.spine_mr`); the classes must be that
  dataset's 20 (:data:`~medtextseg.data.synthetic.spine_mr.CLASS_NAMES`).
- ``names``: the class name alone, the same in every image (any dataset).

Every possible prompt is listed once (:attr:`ClassPrompts.texts`), so a caller tokenises
and, with a frozen text encoder, embeds them once; a description maps to one row of
prompt indices (:meth:`ClassPrompts.rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medtextseg.classes import BACKGROUND

PROMPT_STYLES = ("spine", "names")
ABSENT_STATE = "none"


class ClassPrompts:
    """The prompt table of K classes.

    Args:
        class_names: the K names, background first.
        style: one of :data:`PROMPT_STYLES`.

    Attributes:
        texts: ``P`` distinct prompt strings (index 0 is ``"background"``).

    Example:
        >>> p = ClassPrompts(["background", "lesion"], "names")
        >>> p.texts, p.rows(["anything"]).tolist()
        (['background', 'lesion'], [[0, 1]])
    """

    def __init__(self, class_names: Sequence[str], style: str = "spine"):
        if style not in PROMPT_STYLES:
            raise ValueError(f"vlm.prompts must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
        self.class_names, self.style = list(class_names), style
        k = len(self.class_names)
        if k < 2:
            raise ValueError(f"class prompts need K >= 2 classes (data.num_classes), got {k}")
        if style == "names":
            self.texts = [BACKGROUND, *self.class_names[1:]]
            self._index = {}
            return
        from medtextseg.data.synthetic import spine_mr as sp

        if self.class_names != list(sp.CLASS_NAMES):
            raise ValueError(f"vlm.prompts=spine reads the MRSpineSeg grammar and needs its {len(sp.CLASS_NAMES)} "
                             f"classes ({', '.join(sp.CLASS_NAMES[:3])}, ...); set data.classes to them, or use "
                             "vlm.prompts=names")
        self._token_class = [sp.token_class(t) for t in range(len(sp.TOKENS))]
        self.texts = [BACKGROUND]
        self._index: dict[tuple[int, str], int] = {}
        for t, c in enumerate(self._token_class):
            for state in (sp.VERTEBRA_STATES if t % 2 == 0 else sp.DISC_STATES):
                self._index[(c, state)] = len(self.texts)
                self.texts.append(f"{self.class_names[c]} {state}")

    @classmethod
    def of(cls, cfg) -> ClassPrompts:
        """The prompts of a (pre-training) config: its ``data`` classes, its ``vlm.prompts`` style."""
        from medtextseg.classes import class_names

        return cls(class_names(cfg.data.num_classes, cfg.data.classes), cfg.vlm.prompts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _states(self, text: str) -> dict[int, str]:
        from medtextseg.data.synthetic.spine_mr import SpineStateError, parse_spine_text

        try:
            states = parse_spine_text(text)
        except SpineStateError as e:
            raise ValueError(f"vlm.prompts=spine: {e}") from None
        except ValueError:
            raise ValueError(f"vlm.prompts=spine: {text!r} is not in the MRSpineSeg grammar "
                             "('T9 none, T910 none, ..., S split'); use vlm.prompts=names") from None
        return {c: s for c, s in zip(self._token_class, states, strict=True)}

    def rows(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, K]`` int64: row i holds the index in :attr:`texts` of each class's prompt
        under description ``texts[i]``."""
        if self.style == "names":
            return torch.arange(self.num_classes).expand(len(texts), -1).clone()
        out = torch.zeros((len(texts), self.num_classes), dtype=torch.long)
        for i, text in enumerate(texts):
            states = self._states(text)
            for c in range(1, self.num_classes):
                out[i, c] = self._index[(c, states[c])]
        return out

    def absent(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, K]`` bool: True where the description states the class is absent
        (``none``); always False for the background and for the ``names`` style."""
        out = torch.zeros((len(texts), self.num_classes), dtype=torch.bool)
        if self.style == "names":
            return out
        for i, text in enumerate(texts):
            states = self._states(text)
            for c in range(1, self.num_classes):
                out[i, c] = states[c] == ABSENT_STATE
        return out


def check_prompt_texts(prompts: ClassPrompts, samples: Sequence) -> None:
    """Raise one ``ValueError`` naming the first image (``samples``: :class:`Sample`) whose
    text ``prompts`` cannot read, so that a run refuses it before it writes anything; each
    distinct text is parsed once."""
    seen: set[str] = set()
    for s in samples:
        if s.text in seen:
            continue
        seen.add(s.text)
        try:
            prompts.rows([s.text])
        except ValueError as e:
            raise ValueError(f"the text of {s.split} image {s.id} ({s.image_path.name}): {e}") from None
