"""Helpers shared by the test modules, one module per topic. Test modules import from here (or from
``tests.arrow_fixtures`` and ``tests.tui_fake``), never from one another nor from a ``conftest.py``
(``tests/test_layers.py`` checks it); the ``conftest.py`` files keep the fixtures."""

import pkgutil

import pytest

# A failed assert inside a helper reports its values, as it did when the helper lived in a test module
# (pytest rewrites the asserts of test modules and conftests only, and of the modules registered before import).
pytest.register_assert_rewrite(*(f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__)))
