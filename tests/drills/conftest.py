"""Fixtures of the reliability drills: those of the end-to-end tests (loopback only, services)."""

from __future__ import annotations

from tests.e2e.conftest import _loopback_only, services

__all__ = ["_loopback_only", "services"]
