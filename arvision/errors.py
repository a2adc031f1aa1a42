"""Errors that are the user's to fix: the CLI prints them without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (params, data, paths): reported as one clear message."""
