"""The one exception type every stage raises for bad input.

The CLI turns it into a single line on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""


class BackMixError(Exception):
    """Bad input or state a user can fix: the message names the thing at fault."""
