"""Failures that a retry cannot mend.

A step fails either on something that may pass on a second try (a store or network error, a
worker killed for memory, a lease lost to another writer) or on its inputs themselves: a bad
config, data that fails the quality gate, an archive that is not the dataset, training that
diverges. The second kind derive from :class:`PermanentError`, so that a scheduler need not
retry them: the Airflow operators fail such a task at once (``AirflowFailException``) instead
of spending the DAG's retries and their back-off on the same failure, and the CLI exits 2
instead of 1.
"""

from __future__ import annotations


class PermanentError(Exception):
    """The same inputs and config would fail the same way again: change them, then rerun."""


class ConfigError(PermanentError, ValueError):
    """A configuration problem. ``problems`` holds one line per problem."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]
