"""lskd.terms: term names <-> (kind, map), the schemes' terms, the released assignment, RGE's layers."""

from __future__ import annotations

import pytest

from lskd.terms import (
    CLASSIFICATION_TERMS,
    HEAD_LAYER,
    LAYERS,
    MAP_LAYERS,
    MAP_NAMES,
    NUM_MAPS,
    RELEASED_SCHEMES,
    SCHEMES,
    basic_term_names,
    map_term,
    masked_scheme,
    parse_term,
    scheme_terms,
    term_kind,
    term_layer,
    term_map,
)


def test_names_parse_back_to_their_kind_and_map():
    for l in range(NUM_MAPS):
        for kind in ("pod", "md", "mcd"):
            assert parse_term(map_term(kind, l)) == (kind, l)
    assert map_term("mcd", 4) == "mcd" and map_term("mcd", 2) == "mcd2" and map_term("pod", 4) == "pod4"
    assert parse_term("mcd4") == ("mcd", 4)  # the indexed spelling reads as the same map
    for name in (*CLASSIFICATION_TERMS, "foo", "pod", "md", "podx1"):
        assert parse_term(name) is None and term_map(name) is None and term_kind(name) is None


def test_released_assignment_gives_the_nine_terms():
    assert len(MAP_NAMES) == NUM_MAPS == len(RELEASED_SCHEMES)
    names = [n for l, s in sorted(RELEASED_SCHEMES.items()) for n in scheme_terms(l, s)]
    assert names == ["pod0", "pod1", "md2", "md3", "md4", "mcd", "md5"]
    assert [term_map(n) for n in names] == [0, 1, 2, 3, 4, 4, 5]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_schemes(scheme):
    terms = scheme_terms(2, scheme)
    assert set(terms) <= set(basic_term_names(2)) == {"pod2", "md2", "mcd2"}
    assert masked_scheme(scheme) == any(term_kind(n) in ("md", "mcd") for n in terms)
    assert masked_scheme(scheme) == (scheme in ("md", "md+mcd"))


def test_every_term_has_one_of_the_layers():
    assert set(MAP_LAYERS) == set(range(NUM_MAPS))
    assert {key for key, _ in MAP_LAYERS.values()} | {HEAD_LAYER[0]} == set(LAYERS)
    for l in range(NUM_MAPS):
        for name in basic_term_names(l):
            assert term_layer(name) == MAP_LAYERS[l]
    assert all(term_layer(n) == HEAD_LAYER for n in CLASSIFICATION_TERMS)
    with pytest.raises(ValueError, match="'foo'"):
        term_layer("foo")
