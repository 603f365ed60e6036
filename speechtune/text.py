"""Text normalisation: a registry keyed by language code.

Every recipe normalises references (and training targets) with ``get_normalizer(language)``.
Normalisers never strip letters a language needs: they keep every Unicode letter (æ, ø, å, ä,
ö, ü, ß, ...), lower-case with ``str.lower`` (not ``casefold``, which turns ß into ss) and
compose to NFC so that "å" typed as a + combining ring equals the precomposed "å".

To add a language, register a function::

    from speechtune.text import register_normalizer, basic_normalize

    @register_normalizer("xx")
    def normalize_xx(text: str) -> str:
        return basic_normalize(text)
"""

import re
import unicodedata
from collections.abc import Callable

_NORMALIZERS: dict[str, Callable[[str], str]] = {}
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_SPACES = re.compile(r"\s+")


def register_normalizer(*languages: str):
    """Decorator: register ``fn(text) -> text`` as the normaliser of ``languages``."""

    def wrap(fn):
        for lang in languages:
            _NORMALIZERS[lang] = fn
        return fn

    return wrap


def available_languages() -> list[str]:
    """Language codes that have a normaliser."""
    return sorted(_NORMALIZERS)


def get_normalizer(language: str) -> Callable[[str], str]:
    """Return the normaliser for ``language`` or fail with a message that says how to add one."""
    try:
        return _NORMALIZERS[language]
    except KeyError:
        base = language.split("-")[0]
        hint = (f"'{language}' looks like a CommonVoice locale: pass its language code, "
                f"--language={base}. " if base != language and base in _NORMALIZERS else "")
        raise ValueError(
            f"No text normaliser for language '{language}'. {hint}Available: "
            f"{', '.join(available_languages())}. Add one with "
            f"@speechtune.text.register_normalizer('{language}') (see speechtune/text.py)."
        ) from None


def basic_normalize(text: str, keep_apostrophe: bool = True) -> str:
    """NFC, lower-case, punctuation and symbols to spaces, collapse whitespace; keep all letters."""
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES).lower()
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] in "LNM" or (ch == "'" and keep_apostrophe):
            out.append(ch)
        else:
            out.append(" ")
    text = "".join(out)
    if keep_apostrophe:  # an apostrophe only survives inside a word ("don't", not "'quoted'")
        text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return _SPACES.sub(" ", text).strip()


@register_normalizer("en")
def normalize_english(text: str) -> str:
    """English: lower-case letters, digits and in-word apostrophes ("don't")."""
    return basic_normalize(text, keep_apostrophe=True)


# Languages whose orthography basic_normalize serves as is: letters (incl. æ ø å ä ö ü ß é ...)
# and digits kept, punctuation dropped. Apostrophes are kept in words for the Romance and
# Germanic languages that write them (l'homme, Peter's).
register_normalizer("da", "nb", "nn", "sv", "de", "nl", "fi", "is", "pl", "cs", "es", "pt")(
    lambda text: basic_normalize(text, keep_apostrophe=False)
)
register_normalizer("fr", "it", "ca")(lambda text: basic_normalize(text, keep_apostrophe=True))



class EventTags:
    """What to do with event tags in transcripts: ``[noise]``, ``<laughter>``, ``<unk>``.

    A tag is a bracketed span standing as a whole token (no letter or digit glued to either
    bracket, no space just inside them, at most 60 characters) for each bracket pair in
    ``brackets`` (default square and angle; parentheses are ordinary text unless ``"()"`` is
    added: "(inaudible)" is a tag in some corpora, "(laughs)" part of the text in others).
    ``policy``: ``drop`` removes tags, ``keep`` leaves them to the language's normaliser (which
    turns ``[noise]`` into the word "noise"), ``map`` replaces each by ``token``. Applied to the
    raw transcript before normalisation, so targets and references get the same treatment.
    """

    POLICIES = ("drop", "keep", "map")

    def __init__(self, policy="drop", brackets="[]<>", token=None):
        if policy not in self.POLICIES:
            raise ValueError(f"event_tags={policy!r}: use one of {', '.join(self.POLICIES)}")
        if len(brackets) % 2 or not brackets:
            raise ValueError(f"event_tag_brackets={brackets!r}: give bracket pairs, opening "
                             "then closing, e.g. \"[]<>\" or \"[]<>()\"")
        if policy == "map" and not (token and token.strip() and len(token.split()) == 1):
            raise ValueError(f"event_tags: map needs event_tag_token, one word (got {token!r})")
        self.policy, self.token, self.brackets = policy, token, brackets
        spans = []
        for opening, closing in zip(brackets[::2], brackets[1::2], strict=True):
            o, c, inner = re.escape(opening), re.escape(closing), f"[^{re.escape(brackets)}\\n]"
            spans.append(rf"{o}(?!\s){inner}{{1,60}}(?<!\s){c}")
        self.pattern = re.compile(rf"(?<![^\W_])(?:{'|'.join(spans)})(?![^\W_])")

    def find(self, text: str) -> list[str]:
        """The tags in ``text``, in order."""
        return self.pattern.findall(text)

    def apply(self, text: str) -> str:
        """``text`` with its tags dropped, kept or mapped (``policy``)."""
        if self.policy == "keep":
            return text
        replaced = self.pattern.sub(" " if self.policy == "drop" else f" {self.token} ", text)
        return _SPACES.sub(" ", replaced).strip()

    def check_token(self, language: str):
        """``map``: the token must come out of ``language``'s normaliser unchanged, or it would
        become other words in targets and references."""
        if self.policy == "map":
            normalized = get_normalizer(language)(self.token)
            if normalized != self.token:
                raise ValueError(f"event_tag_token={self.token!r} becomes {normalized!r} in the "
                                 f"'{language}' normaliser: pick a word it keeps as it is, e.g. "
                                 "'noise' (lower case, letters only)")
