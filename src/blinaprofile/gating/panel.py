"""Marker synonyms and channel-to-marker resolution.

Instruments and labs name the same antigen differently (``CCR7``, ``CD197``,
``CD197 (CCR7) BV421``, ``141Pr_CCR7``). :func:`resolve_markers` maps the canonical
marker names a gating strategy needs onto a sample's channels, insensitive to case,
spaces and punctuation, and raises :class:`PanelMismatchError` naming what is
missing and what the file has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from blinaprofile.errors import PanelMismatchError

__all__ = ["SYNONYMS", "canonical_marker", "normalize", "resolve_markers"]

#: canonical marker -> accepted spellings (compared after :func:`normalize`).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "CD3": ("CD3", "CD3e", "CD3epsilon", "UCHT1", "SK7"),
    "CD4": ("CD4",),
    "CD8": ("CD8", "CD8a", "CD8alpha", "CD8A"),
    "CD45RA": ("CD45RA",),
    "CD45RO": ("CD45RO",),
    "CCR7": ("CCR7", "CD197"),
    "TIM3": ("TIM3", "TIM-3", "CD366", "HAVCR2"),
    "PD1": ("PD1", "PD-1", "CD279", "PDCD1"),
    "CD25": ("CD25", "IL2RA"),
    "CD127": ("CD127", "IL7R", "IL7RA"),
    "CD19": ("CD19",),
    "CD56": ("CD56", "NCAM1"),
    "CD14": ("CD14",),
    "CD45": ("CD45", "PTPRC"),
    "Viability": (
        "Viability",
        "Live/Dead",
        "LiveDead",
        "L/D",
        "LD",
        "Live Dead Aqua",
        "Live/Dead Aqua",
        "Aqua",
        "Zombie",
        "Zombie Aqua",
        "Zombie NIR",
        "Zombie UV",
        "Zombie Violet",
        "Zombie Yellow",
        "FVS",
        "FVS510",
        "FVS575V",
        "FVS700",
        "FVS780",
        "Fixable Viability",
        "Fixable Viability Dye",
        "eFluor780 viability",
        "7-AAD",
        "7AAD",
        "DAPI",
        "PI",
        "Propidium Iodide",
        "Dead",
        "Live",
        "Cisplatin",
        "195Pt",
        "198Pt",
    ),
}


def normalize(text: str) -> str:
    """Lower-case and drop everything but letters and digits (``'TIM-3 '`` -> ``'tim3'``)."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


_LOOKUP: dict[str, str] = {normalize(s): canon for canon, syns in SYNONYMS.items() for s in syns}
# tokens that are fluorochromes or isotopes, not antigens, are ignored when matching
_TOKEN_SPLIT = re.compile(r"[\s_()\[\]{}:;,|]+")


def canonical_marker(label: str) -> str | None:
    """The canonical marker a channel label denotes, or ``None``.

    The whole label is tried first (``'Live/Dead Aqua'``), then each token
    (``'CD197 (CCR7) BV421'`` -> ``CCR7``; ``'141Pr_CD3'`` -> ``CD3``).
    """
    if not label:
        return None
    whole = _LOOKUP.get(normalize(label))
    if whole:
        return whole
    hits = {_LOOKUP[n] for tok in _TOKEN_SPLIT.split(label) if (n := normalize(tok)) in _LOOKUP}
    if len(hits) == 1:
        return hits.pop()
    return None


def resolve_markers(
    needed: Iterable[str],
    channels: Sequence[str],
    markers: Sequence[str],
    *,
    path: str | None = None,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Map each needed canonical marker (or literal channel name) to a channel name.

    Parameters
    ----------
    needed
        Canonical marker names (``'CCR7'``) or channel names (``'FSC-A'``).
    channels, markers
        The sample's ``$PnN`` and ``$PnS`` values, aligned.
    path
        The file, for error messages.
    overrides
        Explicit ``marker -> channel`` assignments that win over matching.

    Raises
    ------
    PanelMismatchError
        Some needed markers are absent, or one marker matches several channels.
    """
    overrides = dict(overrides or {})
    by_canon: dict[str, list[str]] = {}
    for ch, mk in zip(channels, markers, strict=True):
        canon = canonical_marker(mk) or canonical_marker(ch)
        if canon:
            by_canon.setdefault(canon, []).append(ch)
    out: dict[str, str] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    channel_set = set(channels)
    for name in needed:
        if name in overrides:
            if overrides[name] not in channel_set:
                missing.append(f"{name} (override channel {overrides[name]!r})")
                continue
            out[name] = overrides[name]
        elif name in channel_set:
            out[name] = name
        else:
            canon = _LOOKUP.get(normalize(name), name)
            found = by_canon.get(canon, [])
            if len(found) == 1:
                out[name] = found[0]
            elif not found:
                missing.append(name)
            else:
                ambiguous.append(f"{name} -> {found}")
    if missing or ambiguous:
        has = ", ".join(f"{c}={m!r}" if m else c for c, m in zip(channels, markers, strict=True))
        parts = []
        if missing:
            parts.append(f"missing marker(s) {', '.join(missing)}")
        if ambiguous:
            parts.append(f"ambiguous marker(s) {'; '.join(ambiguous)}")
        raise PanelMismatchError(f"{' and '.join(parts)}; the file has: {has}", path=path)
    return out
