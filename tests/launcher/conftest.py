"""The launcher tests use the shared helpers (tests/helpers.py) and fixtures (tests/conftest.py)."""

from ..helpers import REPO, chla, status_json, wait_for_chain, wait_until  # noqa: F401
