"""LSKD's named loss terms: the map each term distils, the schemes of a map, and the layer RGE ties each term to.

Every place that turns a map index into a term name, or a term name back into a map or a
layer (:mod:`lskd.methods.lskd`, :mod:`lskd.search`, :mod:`lskd.weighting`), reads it here.

Maps (docs/MATHEMATICS.md §1.2): the six distilled feature maps, by index.

=====  ==========  ==================================================================
index  name        what
=====  ==========  ==================================================================
0..3   stage1..4   outputs of the four backbone stages
4      aspp        the ASPP output
5      logits      the logits (collapsed to the old classes; masked by M only)
=====  ==========  ==================================================================

Term names (docs/MATHEMATICS.md §3.1):

* ``ce``, ``unce``, ``unkd``: classification terms, on no map;
* ``pod{l}``: Local POD of map l, no masks;
* ``md{l}``: Local POD of map l under the MD masks;
* ``mcd{l}``: second-order pooling (MCD) of map l under the MD masks, named plain ``mcd`` on
  map 4, where the release puts it (its logs, weights and checkpoints use that name).

A map's scheme (:data:`SCHEMES`) is the set of its terms: ``"pod"`` -> ``pod{l}``, ``"md"`` ->
``md{l}``, ``"md+mcd"`` -> ``md{l}`` and the MCD term, ``"none"`` -> nothing. As released
(:data:`RELEASED_SCHEMES`) LSKD's nine terms are ``ce, mcd, unkd, pod0, pod1, md2, md3, md4, md5``.

RGE's layers (docs/MATHEMATICS.md §4.1): term i's gradient is taken on one small parameter
tensor W_i, the first parameter of the layer that produces its map, so that autograd runs
only the part of the graph between the term and W_i (:data:`MAP_LAYERS`): stage k+1's first
parameter for maps k = 0, 1, 2 (group B); stage 4's for map 3 (group A, as in the release,
``W3 = get_layer3() = body.mod5``; the ASPP BatchNorm lies after stage 4, so map 3's gradient
there would be exactly 0); the ASPP output BatchNorm's weight for maps 4, 5 and for the
classification terms (group A).
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

__all__ = [
    "MAP_NAMES",
    "NUM_MAPS",
    "MCD_MAP",
    "LOGITS_MAP",
    "SCHEMES",
    "SCHEME_KINDS",
    "RELEASED_SCHEMES",
    "CLASSIFICATION_TERMS",
    "LAYERS",
    "MAP_LAYERS",
    "HEAD_LAYER",
    "map_term",
    "mcd_name",
    "parse_term",
    "term_map",
    "term_kind",
    "scheme_terms",
    "basic_term_names",
    "masked_scheme",
    "term_layer",
]

#: Names of the six distilled maps, by index, as reported in summaries ("schemes").
MAP_NAMES: Tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4", "aspp", "logits")
NUM_MAPS = len(MAP_NAMES)
#: The map of the released MCD term, whose name carries no index.
MCD_MAP = 4
LOGITS_MAP = 5

#: The schemes a map can be distilled with.
SCHEMES: Tuple[str, ...] = ("pod", "md", "md+mcd", "none")
#: The kinds of term (name without the map index) each scheme adds for its map.
SCHEME_KINDS: Dict[str, Tuple[str, ...]] = {"pod": ("pod",), "md": ("md",), "md+mcd": ("md", "mcd"), "none": ()}
#: The released layer assignment: maps 0-1 Local POD, 2-3 MD, 4 MD + MCD, 5 masked POD (M only).
RELEASED_SCHEMES: Dict[int, str] = {0: "pod", 1: "pod", 2: "md", 3: "md", 4: "md+mcd", 5: "md"}
#: Terms on no map (they act on the head).
CLASSIFICATION_TERMS: Tuple[str, ...] = ("ce", "unce", "unkd")
#: Term kinds computed under the MD masks.
_MASKED_KINDS = ("md", "mcd")

#: RGE's layer keys: the first parameter of backbone stages 1-4 and the ASPP output BatchNorm's weight.
LAYERS: Tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4", "aspp")
#: ``(layer key, group)`` of the terms of each map (module doc).
MAP_LAYERS: Dict[int, Tuple[str, str]] = {
    0: ("stage1", "B"),
    1: ("stage2", "B"),
    2: ("stage3", "B"),
    3: ("stage4", "A"),
    4: ("aspp", "A"),
    5: ("aspp", "A"),
}
#: ``(layer key, group)`` of the classification terms.
HEAD_LAYER: Tuple[str, str] = ("aspp", "A")

_MAP_TERM = re.compile(r"^(pod|md|mcd)(\d+)$")


def map_term(kind: str, l: int) -> str:
    """Name of the term of kind ``"pod"``, ``"md"`` or ``"mcd"`` on map ``l``: ``"{kind}{l}"``,
    except ``"mcd"`` on :data:`MCD_MAP`."""
    if kind == "mcd" and l == MCD_MAP:
        return "mcd"
    return f"{kind}{l}"


def mcd_name(l: int) -> str:
    """Name of the MCD term of map ``l``: ``"mcd"`` on map 4 (the released name), else ``"mcd{l}"``."""
    return map_term("mcd", l)


def parse_term(name: str) -> Optional[Tuple[str, int]]:
    """``(kind, map)`` of a map term (``"pod3"`` -> ``("pod", 3)``, ``"mcd"`` -> ``("mcd", 4)``),
    None for the others (classification terms, unknown names)."""
    if name == "mcd":
        return "mcd", MCD_MAP
    m = _MAP_TERM.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def term_map(name: str) -> Optional[int]:
    """The map index a term distils (``pod3`` -> 3, ``mcd`` -> 4 as released), None for the others."""
    parsed = parse_term(name)
    return None if parsed is None else parsed[1]


def term_kind(name: str) -> Optional[str]:
    """``"pod"``, ``"md"`` or ``"mcd"`` for a map term, None for the others."""
    parsed = parse_term(name)
    return None if parsed is None else parsed[0]


def scheme_terms(l: int, scheme: str) -> Tuple[str, ...]:
    """Names of the terms that scheme ``scheme`` (in :data:`SCHEMES`) gives map ``l`` (``()`` for ``"none"``)."""
    return tuple(map_term(kind, l) for kind in SCHEME_KINDS[scheme])


def basic_term_names(l: int) -> Tuple[str, str, str]:
    """The three basic term names of map ``l``, one per kind: ``(pod{l}, md{l}, mcd_name(l))``."""
    return map_term("pod", l), map_term("md", l), map_term("mcd", l)


def masked_scheme(scheme: str) -> bool:
    """Whether a scheme (in :data:`SCHEMES`) has a term under the MD masks."""
    return any(kind in _MASKED_KINDS for kind in SCHEME_KINDS[scheme])


def term_layer(name: str) -> Tuple[str, str]:
    """``(layer key, group)`` of a term for RGE (module doc): :data:`MAP_LAYERS` of its map,
    :data:`HEAD_LAYER` for the classification terms and for maps past the logits.

    Raises ValueError for a name that is neither a map term nor a classification term."""
    m = term_map(name)
    if m is None:
        if name not in CLASSIFICATION_TERMS:
            raise ValueError(
                f"weighting: no layer is known for the term {name!r}; name map terms pod<k>/md<k>/mcd<k>, "
                f"or give the scheme a layer_of= function"
            )
        return HEAD_LAYER
    return MAP_LAYERS.get(m, HEAD_LAYER)
