"""Names that become path components: checked in one place.

A client's name, a run's name and an adapter label end up as folder names in a run
folder; a name the server did not choose itself (a client's report) must never leave
that folder (``../x``, ``/etc``, ``.hidden``). Safe: 1-64 letters, digits, ``.``, ``_``
or ``-``, starting with a letter or digit.
"""

from __future__ import annotations

import re

from fedtune.errors import FedtuneError

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_safe(name: object) -> bool:
    return isinstance(name, str) and _SAFE.fullmatch(name) is not None


def check(name: object, what: str = "name") -> str:
    """``name`` if safe as one path component, else FedtuneError saying how to fix it."""
    if not is_safe(name):
        raise FedtuneError(f"{what} {str(name)[:80]!r} cannot be a folder name: use 1-64 letters, digits, '.', '_' "
                           "or '-', starting with a letter or digit")
    return name


def reported(name: object, node: int) -> str:
    """The name a client reported, or ``node-<id>`` when it is not a safe name."""
    return name if is_safe(name) else f"node-{node}"
