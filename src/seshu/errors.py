"""The one exception type for mistakes a user can fix (bad path, bad record, bad config), and the one way to
quote a library's exception in such a message.

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything else is a bug or a
runtime failure and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty (a bare
    `str(exc).splitlines()[0]` raises IndexError there)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
