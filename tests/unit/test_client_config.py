"""Client configuration: option > environment > ~/.ci/config > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from ci_client.config import (
    DEFAULT_SERVER_URL,
    load_config,
    parse_config_file,
    parse_server_urls,
    resolve_config,
)
from ci_client.packing import DEFAULT_MAX_UPLOAD_BYTES
from ci_common.errors import AuthenticationError, InvalidInput

FILE = {"api_key": "ci_file", "server_url": "http://file:1", "max_upload": "10MB"}
ENV = {"CI_API_KEY": "ci_env", "CI_SERVER_URL": "http://env:2", "CI_MAX_UPLOAD": "20MB"}


def test_option_beats_environment_beats_file() -> None:
    both = resolve_config(api_key="ci_flag", server="http://flag:3", max_upload="30MB",
                          environ=ENV, file_values=FILE)
    assert (both.api_key, both.server_urls, both.max_upload_bytes) == (
        "ci_flag", ("http://flag:3",), 30 * 1024**2)
    env = resolve_config(environ=ENV, file_values=FILE)
    assert (env.api_key, env.server_urls, env.max_upload_bytes) == (
        "ci_env", ("http://env:2",), 20 * 1024**2)
    file = resolve_config(environ={}, file_values=FILE)
    assert (file.api_key, file.server_urls, file.max_upload_bytes) == (
        "ci_file", ("http://file:1",), 10 * 1024**2)


def test_defaults_when_nothing_is_set() -> None:
    config = resolve_config(environ={}, file_values={})
    assert config.api_key is None
    assert config.server_urls == (DEFAULT_SERVER_URL,) == ("http://localhost:8000",)
    assert config.max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES == 50 * 1024**2


def test_empty_environment_variable_counts_as_unset() -> None:
    config = resolve_config(environ={"CI_API_KEY": "", "CI_SERVER_URL": " "}, file_values=FILE)
    assert config.api_key == "ci_file"
    assert config.server_urls == ("http://file:1",)


def test_several_server_urls() -> None:
    assert parse_server_urls("http://a:8000/, http://b:8001 ,,https://c") == (
        "http://a:8000", "http://b:8001", "https://c")
    with pytest.raises(InvalidInput, match="not a server URL: 'localhost:8000'"):
        parse_server_urls("localhost:8000")


def test_config_file_parsing() -> None:
    text = "# my settings\n\n  api_key = ci_abc  \nSERVER_URL=\"http://x:1,http://y:2\"\n"
    assert parse_config_file(text) == {"api_key": "ci_abc", "server_url": "http://x:1,http://y:2"}
    config = resolve_config(environ={}, file_values=parse_config_file(text))
    assert config.server_urls == ("http://x:1", "http://y:2")


def test_config_file_malformed_line_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"cfg line 2: expected name=value, got 'oops'"):
        parse_config_file("api_key=x\noops\n", source="cfg")


def test_missing_key_says_how_to_provide_it() -> None:
    config = resolve_config(environ={}, file_values={"server_url": "http://x:1"})
    with pytest.raises(AuthenticationError) as info:
        config.require_api_key()
    message = info.value.message
    assert "--api-key" in message and "CI_API_KEY" in message and "~/.ci/config" in message
    assert "api_key=" in message


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("api_key=ci_from_file\n")
    assert load_config(environ={}, config_path=path).api_key == "ci_from_file"
    assert load_config(environ={"CI_API_KEY": "ci_env"}, config_path=path).api_key == "ci_env"
    assert load_config(environ={}, config_path=tmp_path / "absent").api_key is None


def test_load_config_defaults_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "config").write_text("api_key=ci_home\n")
    assert load_config(environ={}).api_key == "ci_home"


def test_bad_upload_limit_is_refused() -> None:
    with pytest.raises(InvalidInput):
        resolve_config(max_upload="lots", environ={}, file_values={})
    with pytest.raises(InvalidInput, match="must be positive"):
        resolve_config(max_upload="0", environ={}, file_values={})
