# Doctests in fada_core's docstrings use `torch` without importing it.
import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace):
    doctest_namespace["torch"] = torch
