"""The one exception type for user mistakes.

Anything raised as a :class:`DepthgrowError` is the user's to fix (a bad option, a missing file, a
checkpoint of another run): the command line prints its message on one line and exits with status 2,
without a traceback. Every other exception is a bug in depthgrow and keeps its traceback.
"""


class DepthgrowError(Exception):
    """A problem with the user's input, stated in one line that names what to change."""
