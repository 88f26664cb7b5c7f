"""Typed exceptions of spaceevo.

Library code raises these; only :mod:`spaceevo.cli` turns them into messages and exit codes, so a
user mistake never ends in a traceback.
"""

from __future__ import annotations


class SpaceEvoError(Exception):
    """Base class of every error spaceevo reports to a user."""

    exit_code: int = 1


class UsageError(SpaceEvoError):
    """The user asked for something malformed (bad flag value, unknown name)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file (YAML) is malformed or holds a value outside its allowed set."""


class EncodingError(UsageError):
    """A candidate-space or subnet string does not fit its space."""


class DataError(UsageError):
    """The data set named by ``--data`` is unknown, missing, incomplete or unreadable."""


class DeviceMismatchError(SpaceEvoError):
    """An artifact was produced on another device fingerprint and must not be used here."""

    exit_code = 3


class ArtifactError(SpaceEvoError):
    """An artifact in a run directory or table folder is missing or unreadable."""

    exit_code = 3


class RunMismatchError(UsageError):
    """A run directory holds a run of another space, hyperspace, data set or configuration."""


class TrainingDivergedError(SpaceEvoError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept unchanged."""
