"""Where the `ci` client finds its API key, server URL(s) and upload limit.

Precedence, highest first: command-line option, environment variable, `~/.ci/config`, default.

    api_key      --api-key     CI_API_KEY      api_key=…      (required for every command)
    server URLs  --server      CI_SERVER_URL   server_url=…   http://localhost:8000
    upload limit --max-upload  CI_MAX_UPLOAD   max_upload=…   50MB

Several server URLs may be given separated by commas; the client fails over between them.
The config file holds `name=value` lines; blank lines and lines starting with `#` are ignored.
Resolution is pure (`resolve_config` takes the environment and the file's text); only
`load_config` touches the file system.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ci_common.errors import AuthenticationError, InvalidInput
from ci_common.sizes import DEFAULT_MAX_UPLOAD_BYTES, parse_size

DEFAULT_SERVER_URL = "http://localhost:8000"
ENV_API_KEY = "CI_API_KEY"
ENV_SERVER_URL = "CI_SERVER_URL"
ENV_MAX_UPLOAD = "CI_MAX_UPLOAD"
CONFIG_KEYS = ("api_key", "server_url", "max_upload")

MISSING_KEY_MESSAGE = (
    "no API key: pass --api-key KEY, set the CI_API_KEY environment variable, "
    "or add a line api_key=KEY to ~/.ci/config"
)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What the client needs to talk to the service; api_key is None when none was found."""

    api_key: str | None
    server_urls: tuple[str, ...]
    max_upload_bytes: int

    def require_api_key(self) -> str:
        """The API key, or AuthenticationError saying how to provide one."""
        if not self.api_key:
            raise AuthenticationError(MISSING_KEY_MESSAGE)
        return self.api_key


def default_config_path() -> Path:
    """`~/.ci/config` of the current user."""
    return Path.home() / ".ci" / "config"


def parse_config_file(text: str, source: str = "~/.ci/config") -> dict[str, str]:
    """The `name=value` pairs of a config file; raises InvalidInput naming a malformed line."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"{source} line {number}: expected name=value, got {line!r}")
        values[name.strip().lower()] = _unquote(value.strip())
    return values


def parse_server_urls(text: str) -> tuple[str, ...]:
    """Comma-separated URLs without trailing slashes; InvalidInput when one is not http(s)."""
    urls = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    if not urls:
        raise InvalidInput("no server URL given")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"not a server URL: {url!r} (expected http://host:port)")
    return urls


def resolve_config(
    *,
    api_key: str | None = None,
    server: str | None = None,
    max_upload: str | None = None,
    environ: Mapping[str, str] | None = None,
    file_values: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Apply the precedence option > environment > config file > default."""
    env = {} if environ is None else environ
    from_file = {} if file_values is None else file_values
    key = _first(api_key, env.get(ENV_API_KEY), from_file.get("api_key"))
    urls = _first(server, env.get(ENV_SERVER_URL), from_file.get("server_url"))
    size_text = _first(max_upload, env.get(ENV_MAX_UPLOAD), from_file.get("max_upload"))
    max_bytes = DEFAULT_MAX_UPLOAD_BYTES if size_text is None else parse_size(size_text)
    if max_bytes <= 0:
        raise InvalidInput(f"the upload limit must be positive, got {size_text!r}")
    return ClientConfig(api_key=key, server_urls=parse_server_urls(urls or DEFAULT_SERVER_URL),
                        max_upload_bytes=max_bytes)


def load_config(
    *,
    api_key: str | None = None,
    server: str | None = None,
    max_upload: str | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> ClientConfig:
    """resolve_config with the real environment and config file (a missing file is fine)."""
    path = default_config_path() if config_path is None else config_path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    file_values = parse_config_file(text, source=str(path))
    return resolve_config(api_key=api_key, server=server, max_upload=max_upload,
                          environ=os.environ if environ is None else environ,
                          file_values=file_values)


def _first(*candidates: str | None) -> str | None:
    """The first candidate that is set and not blank (an empty variable counts as unset)."""
    for candidate in candidates:
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value
