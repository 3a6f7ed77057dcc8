"""Marker synonyms and channel-to-marker resolution.

Instruments and labs name the same antigen differently (``CCR7``, ``CD197``,
``CD197 (CCR7) BV421``, ``141Pr_CCR7``). :func:`resolve_markers` maps the canonical
marker names a gating strategy needs onto a sample's channels, insensitive to case,
spaces and punctuation, and raises :class:`PanelMismatchError` naming what is
missing and what the file has.

``$PnS`` is free text (an operator can type a patient's name into it), so this module
also says which labels name a *known* marker (:func:`is_known_marker`, :func:`marker_label`):
a panel synonym, a CD antigen, a marker of the active panel (``configs/panels``) or one the
caller declares. :func:`blinaprofile.io.privacy.redact_markers` uses it to decide which labels
may leave the reader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from blinaprofile.errors import PanelMismatchError

__all__ = [
    "SYNONYMS",
    "canonical_marker",
    "is_known_marker",
    "marker_label",
    "normalize",
    "panel_markers",
    "resolve_markers",
]

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


#: A cluster-of-differentiation antigen (``CD57``, ``CD45RA``, ``CD11b``, ``CD235ab``,
#: ``CD62L``), matched on the :func:`normalize`-d label: never a person's name.
_CD_ANTIGEN = re.compile(r"cd[0-9]{1,3}(?:[a-e]|ab|ra|ro|rb|rc|l)?")


def panel_markers(path: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """The marker names a panel YAML declares (its ``channels[].marker`` values).

    Parameters
    ----------
    path
        A panel YAML; default the active panel (:attr:`Settings.default_panel`).

    Returns
    -------
    tuple of str
        Empty when the file does not exist (e.g. a config folder without panels).

    Raises
    ------
    ConfigError
        The panel file exists but is not a valid panel.
    """
    from blinaprofile.settings import settings

    p = Path(path) if path is not None else settings.default_panel
    if not p.is_file():
        return ()
    return _panel_markers_cached(str(p.resolve()), p.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _panel_markers_cached(path: str, mtime_ns: int) -> tuple[str, ...]:
    from blinaprofile.config import PanelConfig, load_config

    panel = load_config(PanelConfig, path)
    return tuple(c.marker for c in panel.channels if c.marker)


def is_known_marker(label: str, *, declared: Iterable[str] = ()) -> bool:
    """Whether a whole label names a known marker (compared after :func:`normalize`).

    Known: a spelling in :data:`SYNONYMS`, a CD antigen (``CD57``), a marker of the active
    panel (:func:`panel_markers`) or one of ``declared`` (e.g. the names a gating strategy
    reads, or the sample's channel names). Only ASCII labels qualify, since
    :func:`normalize` drops every other letter.

    Parameters
    ----------
    label
        A ``$PnS`` value.
    declared
        Further names the caller declares as markers.
    """
    text = label.strip()
    key = normalize(text)
    if not key or not text.isascii():
        return False
    if key in _LOOKUP or _CD_ANTIGEN.fullmatch(key):
        return True
    return any(normalize(d) == key for d in (*declared, *panel_markers()))


def marker_label(label: str, *, declared: Iterable[str] = ()) -> str | None:
    """What may be shown of a ``$PnS`` label, or ``None`` when nothing may.

    The label itself when it names a known marker (:func:`is_known_marker`), else the
    canonical marker it resolves to (``'Jane Roe CD3'`` -> ``'CD3'``), else ``None``.
    Either way the resolution of channels to markers is unchanged: a label and what is
    shown of it have the same :func:`canonical_marker`.

    Parameters
    ----------
    label
        A ``$PnS`` value.
    declared
        Further names the caller declares as markers (see :func:`is_known_marker`).
    """
    if is_known_marker(label, declared=declared):
        return label
    return canonical_marker(label)


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
    needed = list(needed)
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
        from blinaprofile.io.privacy import redact_markers

        shown = redact_markers(channels, markers, declared=[*needed, *overrides.values()])
        has = ", ".join(f"{c}={m!r}" if m else c for c, m in zip(channels, shown, strict=True))
        parts = []
        if missing:
            parts.append(f"missing marker(s) {', '.join(missing)}")
        if ambiguous:
            parts.append(f"ambiguous marker(s) {'; '.join(ambiguous)}")
        raise PanelMismatchError(f"{' and '.join(parts)}; the file has: {has}", path=path)
    return out
