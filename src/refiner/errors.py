"""The base of every error refiner raises for a user to read: one class for the command line to catch.

Each project error derives from :class:`RefinerError` and also from the built-in class it had before
(``ConfigError`` is still a ``ValueError``, ``TrainingError`` a ``RuntimeError``), so that code catching
either keeps working. Its message is one sentence that says what to do; ``refiner`` prints it, no traceback.
"""

__all__ = ['RefinerError']


class RefinerError(Exception):
    """An error whose message a user can act on (a file, a flag, a config key, a device)."""
