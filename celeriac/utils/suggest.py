""" "Did you mean …?" for every name a user can misspell: settings, options, serializers."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The known name closest to ``word``, or None when nothing is close."""
    matches = difflib.get_close_matches(word, sorted(known), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """`` Did you mean 'x'?`` for the closest known name, or ``""`` when nothing is close."""
    match = closest(word, known, cutoff)
    return f" Did you mean {match!r}?" if match else ""
