"""The controller: reconciles job rows into Docker containers (see ci_controller.reconciler)."""

from __future__ import annotations

from ci_controller.reconciler import Controller

__all__ = ["Controller"]
