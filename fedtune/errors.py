"""The one exception type for mistakes a user can fix (bad config, data, model name...).

The CLI prints its message on one line and exits with code 2; everything else is a bug
and keeps its traceback.
"""


class FedtuneError(Exception):
    """A user-fixable problem. The message names the problem and the fix."""
