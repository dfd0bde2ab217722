"""What is wrong with a dataset or an input folder: every problem with its file and its fix.

Readers, validation and ``predict`` build :class:`Problem` records and raise one
:class:`DataError` holding all of them, so a user sees everything at once.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataError", "Problem"]

# Lines shown of a group of problems of one kind before "... and N more like it".
GROUP_SHOWN = 3

# What differs between two problems of one kind: quoted names, file names, numbers and sizes.
# A list of numbers ("0, 7, 128 and 2 more") counts as one.
_NUMBER = r"\d+(?:x\d+)*"
_VARYING = re.compile(
    rf"'[^']*'|\"[^\"]*\"|[\w.-]+\.(?:png|jpe?g|bmp|tiff?|xlsx|csv)\b|{_NUMBER}(?:(?:, | and ){_NUMBER})*",
    re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        file: the offending file (image, mask, text table or manifest).
        message: what is wrong, in words.
        fix: a concrete action that removes the problem.
        kind: a stable short key (``"mask-not-binary"``, ``"no-row"``, ...); problems
            of one kind are grouped when shown. Readers and validation set it
            explicitly; when left empty it is derived from the message and fix
            with their quoted names, file names and numbers blanked, so "mask is
            not binary: values 0, 7" and "... values 0, 128" are one kind. Not
            part of equality: two problems with the same file, message and fix
            are the same problem.
    """

    file: Path
    message: str
    fix: str
    kind: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.kind:
            # frozen: set the derived default the way dataclasses itself would.
            object.__setattr__(self, "kind", _derived_kind(self))

    def __str__(self) -> str:
        return f"{self.file}: {self.message} -> fix: {self.fix}"


def _derived_kind(problem: Problem) -> str:
    return _VARYING.sub("#", f"{problem.message} | {problem.fix}")


class DataError(Exception):
    """A dataset failed validation.

    ``str()`` is a heading ``"N problem(s) found in <dataset>:"`` followed by one
    line ``"- <file>: <message> -> fix: <fix>"`` per problem, grouped by kind: of
    a kind with more than :data:`GROUP_SHOWN` + 1 problems the first
    :data:`GROUP_SHOWN` are shown, then ``"  ... and N more like it"``. Files
    inside the dataset folder are shown relative to it.

    Attributes:
        problems: every problem found, in a stable order (all of them, also those
            the message leaves out).
        dataset: the dataset path that was validated (or None).
    """

    def __init__(self, problems: Sequence[Problem], dataset: str | os.PathLike | None = None):
        self.problems = list(problems)
        self.dataset = Path(dataset) if dataset is not None else None
        super().__init__(self._format())

    def __reduce__(self):
        return (type(self), (self.problems, self.dataset))

    def _shown(self, problem: Problem) -> str:
        shown = problem.file
        if self.dataset is not None:
            base = self.dataset.absolute()
            if base.suffix.lower() == ".csv":
                base = base.parent
            with contextlib.suppress(ValueError):  # outside the dataset: keep it whole
                shown = Path(problem.file).absolute().relative_to(base)
        return f"- {shown}: {problem.message} -> fix: {problem.fix}"

    def _format(self) -> str:
        where = f" in {self.dataset}" if self.dataset is not None else ""
        groups: dict[str, list[Problem]] = {}
        for problem in self.problems:
            groups.setdefault(problem.kind, []).append(problem)
        lines = [f"{len(self.problems)} problem(s) found{where}:"]
        for members in groups.values():
            cut = len(members) > GROUP_SHOWN + 1
            lines += [self._shown(p) for p in (members[:GROUP_SHOWN] if cut else members)]
            if cut:
                lines.append(f"  ... and {len(members) - GROUP_SHOWN} more like it")
        return "\n".join(lines)
