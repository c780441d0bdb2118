"""The one exception type whose message is shown to the user as a single line (no traceback)."""


class ExplorerError(Exception):
    """Bad input or an unmet precondition: the message says what is wrong and how to fix it."""
