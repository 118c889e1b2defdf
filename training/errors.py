"""Errors of the training side that are the user's to fix (a message, exit status 2)."""

from __future__ import annotations


class TableError(ValueError):
    """A routing table that cannot be used as it is; the message names the problem."""


class FleetError(ValueError):
    """A fleet change (anchors, add-model, remove-model, reprice) refused; the message says why."""


class OutputError(ValueError):
    """An output path that cannot be written, or whose replacement would destroy something else."""
