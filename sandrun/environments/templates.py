"""The environment templates: pinned package lists, as data.

Each template is a list of pip requirements pinned with ``==`` to versions
that publish wheels for CPython 3.11 on manylinux x86_64 (the sandbox runs
the host's ``/usr/bin/python3``).  Only the top-level packages are pinned;
their dependencies are resolved when an admin builds the template and the
exact versions installed are recorded in the built prefix's manifest
(``sandrun env list --verbose`` shows them).

``imports`` are the modules ``sandrun env build``/``check`` import to prove a
build works; they differ from package names (``scikit-learn`` is
``sklearn``).  Changing a list changes a template's ``fingerprint``, and a
built prefix with another fingerprint is reported as stale until rebuilt.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_TEMPLATE", "PINNED", "TEMPLATES", "Template"]

DEFAULT_TEMPLATE = "default"
# ``name==version``, optionally with extras; nothing else (no URLs, no ranges, no options).
PINNED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9.+!_-]+")


@dataclass(frozen=True)
class Template:
    """One environment a job may name in its manifest's ``environment``."""

    name: str  # what a manifest names; also the directory under the registry root
    description: str  # one line, shown by /environments
    packages: tuple[str, ...]  # pip requirements, each ``name==version``
    imports: tuple[str, ...] = ()  # modules imported to check a build
    ci_only: bool = False  # for tests; listed, but never needed in production

    def __post_init__(self) -> None:
        for requirement in self.packages:
            if not PINNED.fullmatch(requirement):
                raise ValueError(f"template {self.name}: {requirement!r} is not pinned "
                                 "as name==version")

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the pinned list: a built prefix records it to spot stale builds."""
        return hashlib.sha256("\n".join(sorted(self.packages)).encode()).hexdigest()


_NUMPY = "numpy==1.26.4"

_ALL = (
    Template(
        "default", "General-purpose Python: HTTP, YAML, dates and NumPy",
        (_NUMPY, "requests==2.32.3", "python-dateutil==2.9.0.post0", "PyYAML==6.0.2"),
        imports=("numpy", "requests", "dateutil", "yaml")),
    Template(
        "ml-basic", "Classical machine learning: scikit-learn, pandas, SciPy",
        (_NUMPY, "scipy==1.13.1", "scikit-learn==1.5.0", "pandas==2.2.2", "joblib==1.4.2"),
        imports=("numpy", "scipy", "sklearn", "pandas", "joblib")),
    Template(
        "vision", "Image processing: Pillow, OpenCV (headless), scikit-image, imageio",
        (_NUMPY, "pillow==10.3.0", "opencv-python-headless==4.10.0.84",
         "scikit-image==0.23.2", "imageio==2.34.1"),
        imports=("numpy", "PIL", "cv2", "skimage", "imageio")),
    Template(
        "nlp", "Text processing: NLTK, regex, SentencePiece, tokenizers, RapidFuzz",
        ("nltk==3.8.1", "regex==2024.5.15", "sentencepiece==0.2.0", "tokenizers==0.19.1",
         "rapidfuzz==3.9.3"),
        imports=("nltk", "regex", "sentencepiece", "tokenizers", "rapidfuzz")),
    Template(
        "data-science", "Data analysis: pandas, matplotlib, seaborn, pyarrow, statsmodels",
        (_NUMPY, "pandas==2.2.2", "matplotlib==3.9.0", "seaborn==0.13.2", "pyarrow==16.1.0",
         "statsmodels==0.14.2"),
        imports=("numpy", "pandas", "matplotlib", "seaborn", "pyarrow", "statsmodels")),
    Template(
        "scientific", "Scientific computing: SciPy, SymPy, matplotlib, NetworkX, h5py",
        (_NUMPY, "scipy==1.13.1", "sympy==1.12.1", "matplotlib==3.9.0", "networkx==3.3",
         "h5py==3.11.0"),
        imports=("numpy", "scipy", "sympy", "matplotlib", "networkx", "h5py")),
    Template(
        "test-tiny", "For tests: one small pure-Python wheel (six)",
        ("six==1.16.0",), imports=("six",), ci_only=True),
)

TEMPLATES: Mapping[str, Template] = {t.name: t for t in _ALL}
