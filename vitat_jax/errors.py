"""The one exception type for mistakes a user can fix.

Every `UserError` message is a single line that says what is wrong and what
to do about it; `main.py` prints it without a traceback and exits non-zero.
"""


class UserError(ValueError):
  """A bad config, a missing file or data that cannot be used."""
