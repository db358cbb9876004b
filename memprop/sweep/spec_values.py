"""The checks every table of a spec shares: its error (``SpecError``, naming the file,
the key path, the bad value and what is allowed) and the validators of one value
(an integer, a choice, a non-empty list, an unknown key with "did you mean")."""

from __future__ import annotations

import difflib

from memprop.errors import ConfigError

__all__ = ["SpecError", "unknown_key", "int_value", "choice", "list_value"]


class SpecError(ConfigError):
    """A malformed experiment spec: names the file, the key path, value and what is allowed."""

    def __init__(self, path, key: str, message: str):
        super().__init__(f"{path}: {key}: {message}")
        self.path, self.key = str(path), key


def unknown_key(path, where: str, key: str, allowed) -> SpecError:
    close = difflib.get_close_matches(key, allowed, n=1) or [
        a for a in allowed if key in a or a in key][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SpecError(path, f"{where}{key}", f"unknown key{hint}; allowed keys: "
                     f"{', '.join(allowed)}")


def int_value(path, key, value, low, what="an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(path, key, f"{value!r} is not allowed; it must be {what} >= {low}")
    return value


def choice(path, key, value, options) -> str:
    if value not in options:
        raise SpecError(path, key, f"{value!r} is not allowed; choose one of: "
                        f"{', '.join(map(str, options))}")
    return value


def list_value(path, key, value) -> tuple:
    if not isinstance(value, list):
        raise SpecError(path, key, f"{value!r} is not a list; write e.g. {key.split('.')[-1]} "
                        "= [1, 2, 4]")
    if not value:
        raise SpecError(path, key, "the list is empty, so the grid expands to zero trials")
    return tuple(value)
