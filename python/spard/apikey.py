"""API keys: read from the environment, stripped and checked, and kept out of every message.

``read_api_key`` registers the key it returns (and the raw value it came from); ``redact``
replaces every registered secret in a text with ``***``. The command line runs its error lines
through ``redact``, and so does anything that writes an error to a file (the bench's cell error
files), so a key that reaches an exception text by any route (a library's "Invalid header
value" message, a server that echoes it) still never reaches a terminal, log or file.
"""

from __future__ import annotations

import os
import threading

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
MIN_SECRET_LENGTH = 4  # shorter values would redact ordinary text


class SecretError(ValueError):
    """An API key that cannot be used (the message never holds the key)."""


def register_secret(value: str | None) -> None:
    """Adds ``value`` (and its whitespace-stripped form) to the texts ``redact`` hides."""
    if not value:
        return
    with _LOCK:
        for v in (value, value.strip()):
            if len(v) >= MIN_SECRET_LENGTH:
                _SECRETS.add(v)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    if not text:
        return text
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def read_api_key(env_name: str | None) -> str | None:
    """The API key in ``$env_name``, stripped of surrounding whitespace (a CRLF ``.env`` file
    leaves a trailing CR). None when ``env_name`` is None or the variable is unset or empty.
    Raises SecretError (naming the variable, never the key) when the key has whitespace or
    control characters inside, which no HTTP header can carry."""
    if not env_name:
        return None
    raw = os.environ.get(env_name)
    if raw is None:
        return None
    register_secret(raw)
    key = raw.strip()
    if not key:
        return None
    bad = [c for c in key if not (0x21 <= ord(c) <= 0x7E)]
    if bad:
        kind = "whitespace" if any(c.isspace() for c in bad) else "control or non-ASCII characters"
        raise SecretError(f"the API key in ${env_name} has {kind} inside it ({len(bad)} character(s)); "
                          "an API key is one printable ASCII word: check how the variable is set")
    return key
