"""Build script: compiles the Cython cores in ``_ext/`` into ``macula._ext.<name>``.

Metadata lives in pyproject.toml; this file only declares the extensions.

Environment knobs (for development):
  MACULA_ONLY=trie,codec   build only these cores (others keep their last build)
  MACULA_ANNOTATE=1        write Cython's HTML annotation next to each .pyx (cython -a)
  MACULA_DEBUG=1           no optimisation, with assertions and bounds checks on
"""

from __future__ import annotations

import glob
import os
import shutil

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
debug = os.environ.get("MACULA_DEBUG") == "1"
only = {n.strip() for n in os.environ.get("MACULA_ONLY", "").split(",") if n.strip()}

extensions = []
for path in sorted(glob.glob(os.path.join("_ext", "*.pyx"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if only and name not in only:
        continue
    extensions.append(
        Extension(
            f"macula._ext.{name}",
            [path],
            extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
        )
    )


def _declarations_dir() -> str:
    """A directory where Cython finds each core's declarations under its full module name.

    Cython looks for the ``.pxd`` of module ``macula._ext.<name>`` as
    ``macula/_ext/<name>.pxd`` on its include path; we keep declarations beside their code in
    ``_ext/``, so they are mirrored (copied with their timestamps, so Cython's dependency
    check still sees edits) into ``build/pxd/macula/_ext/`` before every build.
    """
    root = os.path.join(HERE, "build", "pxd")
    dst = os.path.join(root, "macula", "_ext")
    os.makedirs(dst, exist_ok=True)
    for pxd in glob.glob(os.path.join(HERE, "_ext", "*.pxd")):
        shutil.copy2(pxd, os.path.join(dst, os.path.basename(pxd)))
    return root


directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=[_declarations_dir(), os.path.join(HERE, "_ext")],
        annotate=os.environ.get("MACULA_ANNOTATE") == "1",
        quiet=True,
    ),
)
