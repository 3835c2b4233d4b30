"""The one exception type that ``nmaem`` reports as a one-line error."""
from typing import NoReturn


class NmaemError(Exception):
    """Bad input or an impossible request.

    The message is one line and names the file (when there is one) and the problem;
    the command line prints ``nmaem: error: <message>`` and exits with status 2.
    """


def fail(path: object, problem: object) -> NoReturn:
    """Raise :class:`NmaemError` with the ``path: problem`` message layout."""
    if path is None:
        raise NmaemError(str(problem))
    raise NmaemError("%s: %s" % (path, problem))
