"""Marker synonyms and channel-to-marker resolution.

Instruments and labs name the same antigen differently (``CCR7``, ``CD197``,
``CD197 (CCR7) BV421``, ``141Pr_CCR7``). :func:`resolve_markers` maps the canonical
marker names a gating strategy needs onto a sample's channels, insensitive to case,
spaces and punctuation, and raises :class:`PanelMismatchError` naming what is
missing and what the file has.

``$PnS`` is free text (an operator can type a patient's name into it), so this module
also says which labels name a *known* marker (:func:`is_known_marker`, :func:`marker_label`):
a panel synonym, a CD antigen, a marker of the active panel (``configs/panels``) or one the
caller declares. :func:`redact_markers` uses it to decide which labels
may leave the reader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from blinaprofile.errors import PanelMismatchError

if TYPE_CHECKING:
    from blinaprofile.config import PanelConfig
    from blinaprofile.gating.gates import Gate
    from blinaprofile.io.fcs import FCSData

__all__ = [
    "DEFAULT_IF_ABSENT",
    "MISSING_HINTS",
    "POPULATION_GATES",
    "REDACTED_MARKER",
    "SYNONYMS",
    "AbsentGate",
    "AbsentPolicy",
    "BindingPlan",
    "MarkerMatch",
    "absent_notes",
    "absent_policy",
    "canonical_marker",
    "describe_channels",
    "gate_names",
    "is_known_marker",
    "label_channels",
    "load_panel",
    "marker_label",
    "match_markers",
    "normalize",
    "panel_markers",
    "plan_gates",
    "redact_markers",
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
    "FoxP3": ("FoxP3", "FOXP3"),
    # mass cytometry: the iridium DNA intercalator (191Ir, 193Ir)
    "DNA1": ("DNA1", "DNA-1", "191Ir", "Ir191"),
    "DNA2": ("DNA2", "DNA-2", "193Ir", "Ir193"),
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
        "Pt195",
        "198Pt",
        "Pt198",
    ),
}


def normalize(text: str) -> str:
    """Lower-case and drop everything but letters and digits (``'TIM-3 '`` -> ``'tim3'``)."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


_LOOKUP: dict[str, str] = {normalize(s): canon for canon, syns in SYNONYMS.items() for s in syns}
# tokens that are fluorochromes or isotopes, not antigens, are ignored when matching
_TOKEN_SPLIT = re.compile(r"[\s_()\[\]{}:;,|]+")
# a mass channel: element and mass either way round, with CyTOF's Di/Dd suffix
# (``Ir191Di``, ``Pt195Di``, ``191Ir``); compared as ``<mass><element>`` (``191ir``)
_ISOTOPE = re.compile(r"^(?:([A-Z][a-z]?)(\d{2,3})|(\d{2,3})([A-Z][a-z]?))(?:Di|Dd)?$")


def _isotope_key(token: str) -> str | None:
    m = _ISOTOPE.match(token)
    if m is None:
        return None
    element, mass = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
    return f"{mass}{element}".lower()


def canonical_marker(label: str) -> str | None:
    """The canonical marker a channel label denotes, or ``None``.

    The whole label is tried first (``'Live/Dead Aqua'``), then each token
    (``'CD197 (CCR7) BV421'`` -> ``CCR7``; ``'141Pr_CD3'`` -> ``CD3``). A mass channel
    name is read as its isotope (``'Pt195Di'`` -> ``195Pt`` -> ``Viability``;
    ``'Ir191Di'`` -> ``DNA1``).
    """
    if not label:
        return None
    whole = _LOOKUP.get(normalize(label))
    if whole:
        return whole
    keys = [
        k
        for tok in _TOKEN_SPLIT.split(label)
        for k in (normalize(tok), _isotope_key(tok))
        if k is not None
    ]
    hits = {_LOOKUP[k] for k in keys if k in _LOOKUP}
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


@dataclass(frozen=True)
class MarkerMatch:
    """Which needed names a sample's channels provide (:func:`match_markers`).

    Attributes
    ----------
    mapping
        needed name -> channel, for every name that matched exactly one channel.
    missing
        needed name -> how to show it (``'CD8'``, ``"TIM3 (override channel 'PE-A')"``).
    ambiguous
        ``'name -> [channels]'`` for names several channels match.
    """

    mapping: dict[str, str]
    missing: dict[str, str] = field(default_factory=dict)
    ambiguous: list[str] = field(default_factory=list)


def match_markers(
    needed: Iterable[str],
    channels: Sequence[str],
    markers: Sequence[str],
    *,
    overrides: Mapping[str, str] | None = None,
) -> MarkerMatch:
    """Match needed canonical markers (or literal channel names) to channels, without raising.

    Parameters
    ----------
    needed
        Canonical marker names (``'CCR7'``) or channel names (``'FSC-A'``).
    channels, markers
        The sample's ``$PnN`` and ``$PnS`` values, aligned.
    overrides
        Explicit ``marker -> channel`` assignments that win over matching.

    Returns
    -------
    MarkerMatch
        What matched, what is missing and what is ambiguous.
    """
    overrides = dict(overrides or {})
    by_canon: dict[str, list[str]] = {}
    for ch, mk in zip(channels, markers, strict=True):
        canon = canonical_marker(mk) or canonical_marker(ch)
        if canon:
            by_canon.setdefault(canon, []).append(ch)
    out = MarkerMatch(mapping={})
    channel_set = set(channels)
    for name in dict.fromkeys(needed):
        if name in overrides:
            if overrides[name] not in channel_set:
                out.missing[name] = f"{name} (override channel {overrides[name]!r})"
                continue
            out.mapping[name] = overrides[name]
        elif name in channel_set:
            out.mapping[name] = name
        else:
            canon = _LOOKUP.get(normalize(name), name)
            found = by_canon.get(canon, [])
            if len(found) == 1:
                out.mapping[name] = found[0]
            elif not found:
                out.missing[name] = name
            else:
                out.ambiguous.append(f"{name} -> {found}")
    return out


def describe_channels(
    channels: Sequence[str], markers: Sequence[str], *, declared: Iterable[str] = ()
) -> str:
    """The sample's channels with the labels the privacy rules let through (for messages).

    E.g. ``BUV395-A='CD3', FSC-A, PE-A='<unrecognised $P11S>'``: each label as
    :func:`redact_markers` shows it, ``declared`` counting as known markers.
    """
    shown = redact_markers(channels, markers, declared=declared)
    return ", ".join(f"{c}={m!r}" if m else c for c, m in zip(channels, shown, strict=True))


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
    found = match_markers(needed, channels, markers, overrides=overrides)
    if found.missing or found.ambiguous:
        parts = []
        if found.missing:
            parts.append(f"missing marker(s) {', '.join(found.missing.values())}")
        if found.ambiguous:
            parts.append(f"ambiguous marker(s) {'; '.join(found.ambiguous)}")
        has = describe_channels(channels, markers, declared=[*needed, *(overrides or {}).values()])
        raise PanelMismatchError(f"{' and '.join(parts)}; the file has: {has}", path=path)
    return found.mapping


# --------------------------------------------------------------------------- partial binding
#: What a partial bind (``GateTree.bind(partial=True)``) does with a gate whose markers the
#: sample lacks: ``skip`` it (its children are gated from its nearest present ancestor),
#: ``omit`` it and everything below it (features that need it are NaN), or raise
#: :class:`PanelMismatchError` (``error``).
AbsentPolicy = Literal["skip", "omit", "error"]

#: Gates that select a population a file may already have been gated to: FlowJo exports of
#: gated T cells lack scatter, viability or CD3 channels.
POPULATION_GATES: tuple[str, ...] = ("lymphocytes", "singlets", "live", "cd3")

#: The policy of a gate its strategy does not set (``if_absent`` in the gating YAML): the
#: population gates are skipped; the checkpoint and Treg gates, panel extensions many
#: panels lack, are omitted (their features are NaN); every other gate (CD4/CD8, the
#: memory subsets, any gate of an imported strategy) is required.
DEFAULT_IF_ABSENT: dict[str, AbsentPolicy] = {
    **dict.fromkeys(POPULATION_GATES, "skip"),
    "cd8_tim3": "omit",
    "cd8_pd1": "omit",
    "cd4_treg": "omit",
}


#: What to tell a user whose file lacks one of these markers (the error names the rest).
_DNA_HINT = (
    "DNA1/DNA2 are the iridium DNA intercalator (Ir191Di/Ir193Di) a mass cytometer records "
    "with every cell: not a CyTOF file, or named otherwise? label them with --marker "
    "CHANNEL=DNA1 --marker CHANNEL=DNA2"
)
MISSING_HINTS: dict[str, str] = {
    "DNA1": _DNA_HINT,
    "DNA2": _DNA_HINT,
    "Viability": "label a viability dye channel with --marker CHANNEL=Viability",
}


def absent_policy(gate_id: str, policies: Mapping[str, str] | None = None) -> AbsentPolicy:
    """The policy for a gate whose markers a sample lacks (explicit, else the default).

    Parameters
    ----------
    gate_id
        The gate.
    policies
        Explicit ``gate id -> policy`` (a strategy's ``if_absent`` settings).

    Returns
    -------
    str
        ``skip``, ``omit`` or ``error``.
    """
    given = (policies or {}).get(gate_id)
    if given in ("skip", "omit", "error"):
        return given  # type: ignore[return-value]
    return DEFAULT_IF_ABSENT.get(gate_id, "error")


@dataclass(frozen=True)
class AbsentGate:
    """A gate a partial bind left out, and why.

    Attributes
    ----------
    gate
        Its id.
    policy
        ``skip`` (its children are gated from ``start``) or ``omit`` (not evaluated, nor is
        anything below it).
    missing
        The names the sample lacks; empty when the gate was left out because ``cause`` was.
    start
        For ``skip``: the gate its children are now gated from (``None``: all events).
    cause
        For a gate left out with another: that gate's id.
    """

    gate: str
    policy: Literal["skip", "omit"]
    missing: tuple[str, ...] = ()
    start: str | None = None
    cause: str | None = None

    @property
    def lacking(self) -> str:
        """What the sample lacks (``'no FSC-A, SSC-A channels'``), or which gate took it along."""
        if not self.missing:
            return f"gate {self.cause} is not evaluated"
        what = ", ".join(self.missing)
        return f"no {what} channel{'s' if len(self.missing) > 1 else ''}"

    @property
    def reason(self) -> str:
        """Why, in a few words (``'no CD3 channel (pre-gated export?)'``)."""
        return f"{self.lacking} (pre-gated export?)" if self.policy == "skip" else self.lacking


def absent_notes(absent: Mapping[str, AbsentGate]) -> list[str]:
    """One line for the skipped gates and one for the omitted ones (none when none).

    Parameters
    ----------
    absent
        :attr:`GateTree.skipped` of a partially bound strategy.

    Returns
    -------
    list of str
        E.g. ``'gates skipped (pre-gated export?): live (no Viability channel), cd3 (no CD3
        channel); their children are gated from the nearest present gate'``.
    """
    out = []
    skipped = [a for a in absent.values() if a.policy == "skip"]
    omitted = [a for a in absent.values() if a.policy == "omit"]
    if skipped:
        what = ", ".join(f"{a.gate} ({a.lacking})" for a in skipped)
        out.append(
            f"gate{'s' if len(skipped) > 1 else ''} skipped (pre-gated export?): {what}; "
            "their children are gated from the nearest present gate"
        )
    if omitted:
        what = ", ".join(f"{a.gate} ({a.lacking})" for a in omitted)
        out.append(f"gate{'s' if len(omitted) > 1 else ''} not evaluated: {what}")
    return out


@dataclass(frozen=True)
class BindingPlan:
    """The gates a sample can be gated with (:func:`plan_gates`).

    Attributes
    ----------
    mapping
        needed name -> channel (for the kept gates' names, and any other that matched).
    gates
        The kept gates in order, reparented past skipped gates (still unbound).
    absent
        gate id -> :class:`AbsentGate` for every gate left out.
    """

    mapping: dict[str, str]
    gates: list[Gate]
    absent: dict[str, AbsentGate]


def gate_names(gate: Gate) -> tuple[str, ...]:
    """The marker or channel names a gate reads (a ratio dimension's two names)."""
    out: list[str] = []
    for d in gate.dims:
        if d.ratio is not None:
            out += [d.ratio.numerator, d.ratio.denominator]
        else:
            out.append(d.name)
    return tuple(dict.fromkeys(out))


def _without_references(adaptive: tuple[Any, ...], gone: Mapping[str, Any]) -> tuple[Any, ...]:
    """Adaptive specs minus ``reference`` gates that were left out (placement then uses its own)."""
    return tuple(
        s.model_copy(update={"reference": None})
        if s is not None and getattr(s, "reference", None) in gone
        else s
        for s in adaptive
    )


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def plan_gates(
    gates: Sequence[Gate],
    channels: Sequence[str],
    markers: Sequence[str],
    *,
    policies: Mapping[str, str] | None = None,
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, str] | None = None,
    source: str = "file",
    strategy: str = "",
) -> BindingPlan:
    """Decide which gates a sample can be gated with, skipping or omitting the others.

    A gate whose names all match a channel is kept. Otherwise its policy
    (:func:`absent_policy`) decides: ``skip`` leaves it out and hangs its children from its
    nearest present ancestor; ``omit`` leaves it out with every gate below it or referring
    to it; ``error`` makes the sample unusable. Adaptive ``reference`` gates that were left
    out are dropped from the placement specs.

    Parameters
    ----------
    gates
        The strategy's gates, parents first.
    channels, markers
        The sample's ``$PnN`` and ``$PnS`` values, aligned.
    policies
        Explicit ``gate id -> policy`` (the strategy's ``if_absent``).
    path
        The file (or panel) for error messages.
    overrides
        Explicit ``marker -> channel`` assignments that win over matching.
    source
        What ``channels`` belong to, for messages (``file``, ``panel``).
    strategy
        The strategy's name, for messages.

    Returns
    -------
    BindingPlan
        The channel mapping, the kept gates and the gates left out.

    Raises
    ------
    PanelMismatchError
        A required gate lacks a marker, a marker matches several channels, or no gate at
        all can be bound. The message names the missing markers, the gates that need them
        and lists the channels.
    """
    names_of = {g.id: gate_names(g) for g in gates}
    needed = [n for g in gates for n in names_of[g.id]]
    found = match_markers(needed, channels, markers, overrides=overrides)
    has = ""
    if found.ambiguous or found.missing:
        has = describe_channels(channels, markers, declared=[*needed, *(overrides or {}).values()])
    if found.ambiguous:
        raise PanelMismatchError(
            f"ambiguous marker(s) {'; '.join(found.ambiguous)}; the {source} has: {has}", path=path
        )
    absent: dict[str, AbsentGate] = {}
    kept: list[Gate] = []
    required: dict[str, list[str]] = {}
    for g in gates:
        parent = g.parent
        while parent in absent and absent[parent].policy == "skip":
            parent = absent[parent].start
        lacking = tuple(n for n in names_of[g.id] if n in found.missing)
        policy = absent_policy(g.id, policies) if lacking else None
        blocked = parent if parent in absent else next((r for r, _ in g.refs if r in absent), None)
        if policy == "error":
            for n in lacking:
                required.setdefault(found.missing[n], []).append(g.id)
        elif blocked is not None:
            absent[g.id] = AbsentGate(g.id, "omit", cause=blocked)
        elif policy is not None:
            start = parent if policy == "skip" else None
            absent[g.id] = AbsentGate(g.id, "skip" if policy == "skip" else "omit", lacking, start)
        else:
            adaptive = _without_references(g.adaptive, absent)
            kept.append(replace(g, parent=parent, adaptive=adaptive))
    of = f" of gating strategy {strategy!r}" if strategy else ""
    if required:
        by_gates: dict[tuple[str, ...], list[str]] = {}
        for name, ids in required.items():
            by_gates.setdefault(tuple(ids), []).append(name)
        needs = "; ".join(
            f"{', '.join(names)} (gate{'s' if len(ids) > 1 else ''} {_listing(list(ids))})"
            for ids, names in by_gates.items()
        )
        hints = dict.fromkeys(MISSING_HINTS[n] for n in required if n in MISSING_HINTS)
        hint = "".join(f" ({h})" for h in hints) if source == "file" else ""
        raise PanelMismatchError(
            f"missing marker(s) {needs}{of}{hint}; the {source} has: {has}", path=path
        )
    if not kept:
        lacking_all = _listing(list(found.missing.values()), limit=8)
        raise PanelMismatchError(
            f"no gate{of} can be bound: missing marker(s) {lacking_all}; the {source} has: {has}",
            path=path,
        )
    return BindingPlan(mapping=found.mapping, gates=kept, absent=absent)


# --------------------------------------------------------------------------- labelling
def load_panel(path: str | os.PathLike[str]) -> PanelConfig:
    """A panel YAML, validated (cached per file and modification time).

    Raises
    ------
    ConfigError
        The file is missing or not a valid panel; the message names it.
    """
    from blinaprofile.config import PanelConfig, load_config

    p = Path(path)
    try:
        key = (str(p.resolve()), p.stat().st_mtime_ns)
    except OSError:
        return load_config(PanelConfig, p)  # raises, naming the file
    return _panel_cached(*key, str(path))


@lru_cache(maxsize=8)
def _panel_cached(resolved: str, mtime_ns: int, given: str) -> PanelConfig:
    from blinaprofile.config import PanelConfig, load_config

    return load_config(PanelConfig, given)


def label_channels(
    data: FCSData,
    *,
    markers: Mapping[str, str] | None = None,
    panel: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Label a sample's channels from a panel and explicit assignments (in place).

    A panel (``--panel``) labels the channels it lists whose ``$PnS`` is empty; a file
    label naming another marker than the panel's is kept, with a warning (that does not
    quote it). ``markers`` (``--marker CHANNEL=MARKER``) replace the label of their
    channel whatever it was.

    Parameters
    ----------
    data
        The sample as read (before the privacy rules apply).
    markers
        ``channel -> marker``; every channel must be one of the file's.
    panel
        A panel YAML.

    Returns
    -------
    list of str
        The marker names to declare to the privacy rules (the panel's and the given ones).

    Raises
    ------
    PanelMismatchError
        A ``markers`` channel is not in the file (the message lists the file's channels).
    ConfigError
        The panel is not a valid panel YAML.
    """
    declared: list[str] = []
    index = {c: i for i, c in enumerate(data.channels)}

    def put(i: int, marker: str) -> None:
        data.markers[i] = marker
        data.keywords[f"$P{i + 1}S"] = marker

    if panel is not None:
        for ch in load_panel(panel).channels:
            if not ch.marker:
                continue
            declared.append(ch.marker)
            i = index.get(ch.channel)
            if i is None:
                continue
            label = data.markers[i]
            if not label.strip():
                put(i, ch.marker)
            elif normalize(label) != normalize(ch.marker) and canonical_marker(
                label
            ) != canonical_marker(ch.marker):
                data.warnings.append(
                    f"channel {ch.channel}: the file's $PnS label differs from the panel's "
                    f"marker {ch.marker!r}; the file's label is used (--marker "
                    f"{ch.channel}={ch.marker} uses the panel's)"
                )
    for channel, marker in (markers or {}).items():
        i = index.get(channel)
        if i is None:
            raise PanelMismatchError(
                f"--marker {channel}={marker}: the file has no channel {channel!r}; its "
                f"channels: {', '.join(data.channels)}",
                path=data.path,
            )
        put(i, marker)
        declared.append(marker)
    return declared


#: what a ``$PnS`` label that names no known marker becomes in every output
REDACTED_MARKER = "<unrecognised $P{index}S>"


def redact_markers(
    channels: Sequence[str], markers: Sequence[str], *, declared: Iterable[str] = ()
) -> list[str]:
    """The ``$PnS`` labels that may leave the reader, aligned with ``channels``.

    Parameters
    ----------
    channels, markers
        A sample's ``$PnN`` and ``$PnS`` values.
    declared
        Names the caller declares as markers (e.g. the names its gating strategy reads);
        the active panel's markers, the panel synonyms, CD antigens and the sample's own
        channel names are always known.

    Returns
    -------
    list of str
        Per channel: ``""`` where there is no label, the label when it names a known marker,
        the canonical marker it resolves to when it only contains one (``'Jane Roe CD3'``
        -> ``'CD3'``), else :data:`REDACTED_MARKER` (``'<unrecognised $P5S>'``). A redacted
        label resolves to the same marker as the original (see
        :func:`blinaprofile.gating.panel.marker_label`), so gating is unchanged; applying
        the function twice changes nothing.
    """
    if len(markers) != len(channels):
        raise ValueError(f"{len(markers)} markers for {len(channels)} channels")
    known = [*declared, *channels]
    out: list[str] = []
    for i, label in enumerate(markers, start=1):
        if not label.strip():
            out.append("")
            continue
        shown = marker_label(label, declared=known)
        out.append(shown if shown is not None else REDACTED_MARKER.format(index=i))
    return out
