"""Checks shared by the tests of model and guide (public as :mod:`pyrovae.testing`)."""

from pyrovae.testing import checked_traces

__all__ = ["checked_traces"]
