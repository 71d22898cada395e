"""Errors the library raises on purpose (besides ValueError/TypeError naming a bad argument)."""


class DamagedArtifact(ValueError):
    """A file or folder that is not a readable artifact of this library (truncated, corrupt, foreign)."""
