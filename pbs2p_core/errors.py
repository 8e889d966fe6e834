"""Errors that carry a message meant for the user: what is wrong and what to change."""


class Pbs2pError(ValueError):
    """Bad input (a config, a path, a file). The message says what to change."""
