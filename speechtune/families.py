"""The model-family registry: ``name -> Family`` class (``speechtune.family``).

A yaml names its family through its base (``family: ctc`` in ``hparams/ctc.yaml``); run.json and
an export's ``speechtune_export.json`` record it. Adding a family is one module (its Brain and
``Family`` subclass) and one line here.
"""

from speechtune.ctc import CTCFamily
from speechtune.family import Family
from speechtune.whisper import WhisperFamily

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (CTCFamily, WhisperFamily)}


def get(name) -> type[Family]:
    """The family registered as ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"family {name!r} is not registered (speechtune.families: "
                         f"{', '.join(FAMILIES)})")
    return FAMILIES[name]
