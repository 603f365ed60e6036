"""CoRal's speaker groups as the manifests hold them (``dialect``, ``gender``, ``age_group``),
following CoRal's own evaluation (github.com/alexandrainst/coral): its ``config/evaluation.yaml``
``sub_dialect_to_dialect`` maps the self-reported sub-dialect to 9 dialect groups, with
``Non-native`` for a ``country_birth`` other than ``DK`` (``src/coral/evaluate.py``); the age
groups are the card's and the split script's (``AgeGroup``: ``[0, 25), [25, 50), [50, -)``).
"""

import re
import unicodedata

UNKNOWN = "unknown"
AGE_GROUPS = ((0, 25, "0-24"), (25, 50, "25-49"), (50, None, "50+"))
NON_NATIVE = "Non-native"
# CoRal's sub_dialect_to_dialect (config/evaluation.yaml), grouped by dialect
DIALECTS = {
    "Bornholmsk": ("bornholmsk",),
    "Fynsk": ("fynsk", "sydfynsk", "vestfynsk (nordvest-, sydvestfynsk)", "langelandsk"),
    "Københavnsk": ("amagermål",),
    "Nordjysk": ("nørrejysk", "vendsysselsk (m. hanherred og læsø)", "himmerlandsk"),
    "Sjællandsk": ("sjællandsk", "nordsjællandsk", "nordvestsjællandsk", "østsjællandsk",
                   "sydsjællandsk (sydligt sydsjællandsk)", "sydvestsjællandsk"),
    "Sydømål": ("sydømål", "nordfalstersk", "sydfalstersk", "lollandsk"),
    "Sønderjysk": ("sønderjysk", "østligt sønderjysk (m. als)",
                   "vestlig sønderjysk (m. mandø og rømø)",
                   "syd for rigsgrænsen: mellemslesvisk, angelmål, fjoldemål"),
    "Vestjysk": ("vestjysk", "thybomål", "morsingmål", "sydvestjysk (m. fanø)", "sallingmål",
                 "fjandbomål"),
    "Østjysk": ("østjysk", "midtøstjysk", "sydøstjysk", "ommersysselsk",
                "djurslandsk (nord-, syddjurs m. nord- og sydsamsø, anholt)"),
}
SUB_DIALECT = {sub: group for group, subs in DIALECTS.items()
               for sub in (*subs, group.lower())}
_SPACES = re.compile(r"\s+")


def clean_text(text):
    """The transcript as written: NFC, whitespace collapsed (letters and case untouched)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text or "")).strip()


def label(value):
    """A metadata value as a group label: NFC, trimmed, whitespace collapsed; empty -> None."""
    return None if value is None else clean_text(str(value)) or None


def age_group(age):
    """``0-24``, ``25-49`` or ``50+`` for an age given as int or string; else ``unknown``."""
    try:
        years = int(float(str(age).strip()))
    except (ValueError, OverflowError):
        return UNKNOWN
    return next((name for low, high, name in AGE_GROUPS
                 if low <= years < (high or 130)), UNKNOWN)


def dialect_group(dialect, country_birth):
    """CoRal's dialect group: ``Non-native`` if born outside DK, else the mapped sub-dialect
    (an unmapped value is kept as written, a missing one is ``unknown``)."""
    country = label(country_birth)
    if country is not None and country.upper() != "DK":
        return NON_NATIVE
    value = label(dialect)
    if value is None:
        return UNKNOWN
    return SUB_DIALECT.get(value.lower(), value)


def gender_label(gender):
    """``female``, ``male``, ``nonbinary`` (either spelling) or the value as written."""
    value = label(gender)
    if value is None:
        return UNKNOWN
    value = value.lower()
    return "nonbinary" if value in ("non-binary", "non binary") else value
