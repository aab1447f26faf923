"""Every exception hubmerge raises at a user, with the exit code the CLI gives it.

Every error a user can cause derives from :class:`HubmergeError`. The CLI prints ``str(err)`` as one line and
exits with ``err.exit_code``; no traceback. Messages say what was wrong, where (file, field, repo, revision,
tensor) and what to do about it; the same facts are kept as attributes (``path``, ``field``, ``repo``,
``revision``, ``tensor``) so that callers can act on them without parsing the text.

Errors that reject a value also subclass :class:`ValueError` where a Python caller would expect one (as
``huggingface_hub``'s ``HFValidationError`` does), so ``except ValueError`` keeps working for them.
"""

from __future__ import annotations

from typing import Any

# Exit codes, documented in the README's error table. 0 is success.
EXIT_OTHER = 1  # the results store, a scoring failure, a missing CUDA device or optional extra: the rest
EXIT_USAGE = 2  # a bad recipe, option, selector, revision name, task or score file
EXIT_SOURCE = 3  # a source checkpoint cannot be read, or sources disagree
EXIT_OUTPUT = 4  # the output cannot be written
EXIT_HUB = 5  # a Hub repo, revision or file is missing, unauthorised, unreachable or corrupt
EXIT_INTEGRITY = 6  # a trajectory anomaly the recipe does not allow (or that `hubmerge check` found)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; partial outputs were removed


class HubmergeError(Exception):
    """Base class: an error the user can act on.

    Keyword fields (``path``, ``field``, ``repo``, ``revision``, ``tensor`` and any other) are stored as
    attributes; absent ones are None.
    """

    exit_code: int = EXIT_OTHER

    def __init__(
        self,
        message: str,
        *,
        path: Any = None,
        field: str | None = None,
        repo: str | None = None,
        revision: str | None = None,
        tensor: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.field, self.repo, self.revision, self.tensor = path, field, repo, revision, tensor


class RecipeError(HubmergeError):
    """A recipe (or an equivalent command-line option) is invalid."""

    exit_code = EXIT_USAGE


class InvalidValueError(RecipeError, ValueError):
    """A value the user wrote is malformed: a size, a list of weights. Also a ``ValueError``, for pydantic."""


class SourceError(HubmergeError):
    """A source checkpoint cannot be read, or sources disagree (names, shapes, buffers)."""

    exit_code = EXIT_SOURCE


class OutputError(HubmergeError):
    """The output cannot be written (exists without --force, unwritable, disk full)."""

    exit_code = EXIT_OUTPUT


class HubError(HubmergeError):
    """A Hub repository, revision or file is missing, unauthorised or corrupt."""

    exit_code = EXIT_HUB


class CorruptSourceError(HubError):
    """A cached Hub file whose bytes, hashed as the merge read them, are not the ones its LFS sha256 names."""


class StreamError(HubError):
    """A source streamed from the Hub could not be read as planned: a range answered wrongly (HTTP 200, another
    ``Content-Range``) or a connection that kept dropping; ``fetch: cache`` is the fallback."""


class RevisionError(HubError):
    """A revision or selector does not match the repository's branches."""

    exit_code = EXIT_USAGE


class RepoIdError(HubError, ValueError):
    """A repo id that is not ``owner/name`` in the Hub's characters (``../etc``, a space, a URL): a usage error,
    refused before any request."""

    exit_code = EXIT_USAGE


class IntegrityError(HubError):
    """A trajectory has an anomaly (missing or duplicated weights) the recipe did not allow."""

    exit_code = EXIT_INTEGRITY


class TaskDataError(RecipeError):
    """A task's data is missing or malformed (a bad line in a request file, an unreachable dataset)."""


class StabilityError(HubmergeError):
    """Scores or result files that stability metrics cannot use (NaN scores, too few checkpoints, bad files)."""

    exit_code = EXIT_USAGE


class ScoresError(HubmergeError, ValueError):
    """Log-likelihoods that cannot be turned into predictions (NaN where a choice exists, mismatched shapes)."""


class StoreError(HubmergeError):
    """The results store cannot be opened, or a request names a model or task it does not hold."""


class DocumentClashError(StoreError):
    """A task's example is registered again as another document (its ``doc_hash`` differs from the stored one)."""

    def __init__(self, message: str, *, doc_id: int, stored: str, new: str) -> None:
        super().__init__(message)
        self.doc_id, self.stored, self.new = doc_id, stored, new


class MissingExtraError(HubmergeError):
    """A feature needs an optional extra that is not installed (``hubmerge[ray]``, ``hubmerge[lm-eval]``)."""


class ClusterError(HubmergeError):
    """A Ray task failed for good: its worker died on every attempt, or it raised something that is not a hubmerge
    error. The message names the task (a merge's shard, a sweep's pass, a (model, task) scoring) and says what was
    left: nothing of a merge, the finished windows of a sweep, the rows already stored of an evaluation."""


class ResultFileError(HubmergeError):
    """An lm-evaluation-harness results or samples file that cannot be read or imported (truncated, malformed,
    inconsistent with another revision's), named with its line where there is one."""

    exit_code = EXIT_USAGE
