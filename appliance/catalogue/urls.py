"""The one rule for a base URL the catalogue names (a backend's, the registry's)."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_backend_url(value: str) -> str:
    """``value`` if it is scheme, host, port and an optional base path, without the final
    slash; ``ValueError`` saying what is wrong otherwise.

    Credentials, a query or a fragment are refused: the URL is shown to operators, logged and
    health-checked, and none of them belongs in a base URL (a backend's key goes in an
    environment variable, see ``RemoteSettings.api_key_env``).
    """
    if any(c.isspace() or not c.isprintable() for c in value) or "\\" in value:
        raise ValueError("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not value.startswith(parts.scheme + "://"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); use api_key_env")
    if parts.query or "?" in value:
        raise ValueError("must not have a query (?...)")
    if parts.fragment or "#" in value:
        raise ValueError("must not have a fragment (#...)")
    if ".." in parts.path.split("/"):
        raise ValueError("must not have '..' in its path")
    del port  # parsed only to check it is a number in range
    return value.rstrip("/")
