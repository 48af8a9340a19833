"""FADA reproduction pipeline built on the public :mod:`fada_core` API.

Sub-packages and modules:

* :mod:`fada_examples.data` -- data sets in their on-disk layouts, label mappings, paired
  transforms, class-balanced sampling and the synthetic GTA5/Cityscapes-like default data.
* model, training, evaluation and analysis modules (see ``examples/README.md``).

The entry scripts in ``examples/`` put their own folder on ``sys.path`` and import this package.
"""
