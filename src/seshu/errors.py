"""The one exception type for mistakes a user can fix (bad path, bad record, bad config).

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything else is a bug or a
runtime failure and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and what to do."""
