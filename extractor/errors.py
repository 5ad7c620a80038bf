"""Errors that end a run with a one-line message instead of a traceback (stdlib only:
the deployment tools import this without the job's packages)."""

import argparse


class JobError(Exception):
    """A run cannot go on; the message is meant for the person who started it."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not the whole usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
