"""Errors that end a run with a one-line message instead of a traceback."""


class JobError(Exception):
    """A run cannot go on; the message is meant for the person who started it."""
