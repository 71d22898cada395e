"""Run the benchmarks from a checkout where the project is not installed (a bare GPU machine).

The wheel (and an editable install) puts the top-level passes/ folder at `compiled_unet.passes`
(pyproject's package-dir). Without an install nothing maps it, and `import compiled_unet` fails. This
finder, last on `sys.meta_path`, maps it to this checkout's passes/ only when no other finder found it, so an
installed package always wins.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

PASSES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "passes")


class _CheckoutPasses(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "compiled_unet.passes" or not os.path.isfile(os.path.join(PASSES, "__init__.py")):
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(PASSES, "__init__.py"),
                                                      submodule_search_locations=[PASSES])


def install() -> None:
    if not any(isinstance(f, _CheckoutPasses) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutPasses())
