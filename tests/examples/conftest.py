"""Make the examples' package ``fada_examples`` importable (it lives in ``<repo>/examples``)."""

import os
import sys

_EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                                         "examples"))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
