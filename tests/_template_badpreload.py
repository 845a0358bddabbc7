"""A ``preload`` module that fails to import (test_template)."""


def _explode() -> None:
    raise ZeroDivisionError("the preload module's own failure")


_explode()
