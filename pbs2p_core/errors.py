"""Errors that carry a message meant for the user: what is wrong and what to change."""


class Pbs2pError(ValueError):
    """Bad input (a config, a path, a file). The message says what to change."""


class ArtifactError(Pbs2pError):
    """A bad or incomplete artifact (corrupted, truncated, missing file, newer format, wrong shape).

    The message names the file and says what to do."""
