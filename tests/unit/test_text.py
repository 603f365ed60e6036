"""Text normalisation registry: letters a language needs survive, unknown languages fail clearly."""

import unicodedata

import pytest

from speechtune.text import available_languages, get_normalizer


def test_danish_keeps_ae_oe_aa_and_lowercases():
    norm = get_normalizer("da")
    assert norm("Søren spiser Æbler på Øen, ikke Åen!") == "søren spiser æbler på øen ikke åen"


def test_nfd_and_nfc_forms_normalise_to_the_same_string():
    norm = get_normalizer("da")
    nfd = unicodedata.normalize("NFD", "blå øl på ærø")
    assert nfd != "blå øl på ærø"
    assert norm(nfd) == norm("blå øl på ærø") == "blå øl på ærø"


def test_german_sharp_s_and_umlauts_survive():
    assert get_normalizer("de")("Die Straße über Köln.") == "die straße über köln"


def test_english_keeps_in_word_apostrophes_only():
    norm = get_normalizer("en")
    assert norm("It's 'quoted' — DON’T stop; “now”.") == "it's quoted don't stop now"


def test_unknown_language_names_the_fix():
    with pytest.raises(ValueError, match=r"No text normaliser for language 'xx'.*register_"):
        get_normalizer("xx")
    assert {"en", "da"} <= set(available_languages())
