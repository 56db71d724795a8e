"""Secrets kept out of logs: credentials in text, and the values of secret-named fields.

A field is secret when its name, ignoring case, ``-`` and ``_``, ends with one of the
configured names: with ``token``, ``access_token``, ``X-Auth-Token`` and ``deviceToken`` are
secret, ``tokens_loaded`` is not. In text, three shapes are rewritten:
``Bearer <credentials>`` (and ``Basic``), ``scheme://user:<password>@``,
and ``<secret name>: <value>`` / ``<secret name>=<value>`` (quoted or not, as JSON, a Python
repr, a header line or a query string put them).

Those shapes cannot catch a secret that nothing names (``f"refused {token}"``). The secrets the
process itself was configured with are known, though: given as ``secrets``, each is replaced
wherever it appears, in any text, whatever surrounds it.
"""

import re
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ("MIN_SECRET_LENGTH", "REDACTED", "Redactor")

REDACTED = "[REDACTED]"

_MAX_DEPTH = 8
# Shorter configured values are not searched for: replacing every "abc" would garble the
# logs without protecting anything worth the name.
MIN_SECRET_LENGTH = 4
_KEY_CACHE_MAX = 4096
_SECRET_GROUPS = ("key_quoted", "key_plain", "scheme_secret", "url_secret")
_SCHEMES = r"(?:bearer|basic)"


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _text_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alternatives = []
    spelled = sorted(
        {"[_-]?".join(re.escape(part) for part in re.split(r"[_-]", n.lower())) for n in names},
        key=len,
        reverse=True,
    )
    if spelled:
        key = rf"(?<![\w-])[\w-]*?(?:{'|'.join(spelled)})[\"']?\s*[:=]\s*"
        alternatives += [
            # A quoted value: the quotes stay, what is between them goes.
            rf"{key}(?P<kq>[\"'])(?P<key_quoted>(?:\\.|(?!(?P=kq))[^\\])*)",
            rf"{key}(?P<key_plain>(?:{_SCHEMES}\s+)?[^\s,;&\"'(){{}}\[\]<>]+)",
        ]
    alternatives += [
        rf"\b{_SCHEMES}\s+(?P<scheme_secret>[^\s,;\"'(){{}}\[\]<>]+)",
        r"\b[a-z][a-z0-9+.-]*://[^\s/:@]*:(?P<url_secret>[^\s/@]+)(?=@)",
    ]
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.IGNORECASE)


def _replace_secret(match: re.Match[str]) -> str:
    whole = match.group()
    start = match.start()
    for group in _SECRET_GROUPS:
        begin = match.start(group)
        if begin != -1:
            return whole[: begin - start] + REDACTED + whole[match.end(group) - start :]
    return whole


class Redactor:
    """Rewrites text and nested values so that no configured secret survives."""

    def __init__(self, fields: Iterable[str], *, secrets: Iterable[str] = ()) -> None:
        names = [n for n in fields if _squash(n)]
        # Longest first: a secret containing another is replaced whole.
        self._secrets = tuple(
            sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        )
        self._suffixes = tuple({_squash(n) for n in names})
        self._pattern = _text_pattern(names)
        # Substrings any text the pattern rewrites contains (lower-cased). Looking for them
        # costs well under a microsecond; the pattern itself several on every line.
        self._hints = tuple(
            {"bearer", "basic", "://"} | {max(re.split(r"[_-]", n.lower()), key=len) for n in names}
        )
        self._secret_keys: dict[str, bool] = {}

    def text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        lowered = text.lower()
        for hint in self._hints:
            if hint in lowered:
                return self._pattern.sub(_replace_secret, text)
        return text

    def is_secret_key(self, key: str) -> bool:
        known = self._secret_keys.get(key)
        if known is None:
            known = _squash(key).endswith(self._suffixes) if self._suffixes else False
            if len(self._secret_keys) < _KEY_CACHE_MAX:
                self._secret_keys[key] = known
        return known

    def value(self, value: Any, depth: int = 0) -> Any:
        """``value`` with secrets replaced; containers are copied, never changed in place."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            if depth >= _MAX_DEPTH:
                return REDACTED
            return {
                k: REDACTED if self.is_secret_key(str(k)) else self.value(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            if depth >= _MAX_DEPTH:
                return REDACTED
            return [self.value(v, depth + 1) for v in value]
        return value

    def fields(self, fields: MutableMapping[str, Any]) -> None:
        """Redact a record's own (freshly built, top-level) field mapping in place."""
        for key, value in fields.items():
            if self.is_secret_key(key):
                fields[key] = REDACTED
            elif not isinstance(value, int | float | bool | None):
                fields[key] = self.value(value, 1)
