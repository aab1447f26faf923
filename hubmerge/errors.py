"""hubmerge's exceptions.

Every error a user can cause derives from :class:`HubmergeError`. The CLI prints ``str(err)`` as one
line and exits with ``err.exit_code``; no traceback. Messages say what was wrong, where (file,
field, revision, tensor) and what to do about it.
"""

from __future__ import annotations


class HubmergeError(Exception):
    """Base class: an error the user can act on."""

    exit_code: int = 1


class RecipeError(HubmergeError):
    """A recipe (or an equivalent command-line option) is invalid."""

    exit_code = 2


class SourceError(HubmergeError):
    """A source checkpoint cannot be read, or sources disagree (names, shapes, buffers)."""

    exit_code = 3


class OutputError(HubmergeError):
    """The output cannot be written (exists without --force, unwritable, disk full)."""

    exit_code = 4


class HubError(HubmergeError):
    """A Hub repository, revision or file is missing, unauthorised or corrupt."""

    exit_code = 5


class RevisionError(HubError):
    """A revision or selector does not match the repository's branches."""

    exit_code = 2


class IntegrityError(HubError):
    """A trajectory has an anomaly (missing or duplicated weights) the recipe did not allow."""

    exit_code = 6


class TaskDataError(RecipeError):
    """A task's data is missing or malformed (a bad line in a request file, an unreachable dataset)."""

    exit_code = 2


class StabilityError(HubmergeError):
    """Scores or result files that stability metrics cannot use (NaN scores, too few checkpoints, bad files)."""

    exit_code = 2
