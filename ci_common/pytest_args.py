"""Which pytest arguments a submission may pass (`ci submit test -- -k slow -x`). Pure.

The arguments reach pytest as separate argv entries (no shell anywhere), after the runner's
own (`-v -p no:cacheprovider`, and `--junitxml` through PYTEST_ADDOPTS). Everything is allowed
except what would defeat the runner's report or the job's layout:

- `--junitxml` / `--junit-xml` (a later one wins over the runner's: no report) and
  `--junit-prefix` (the report's test ids would no longer be pytest's node ids);
- `-p NAME` (`-p no:junitxml` unloads the report; loading plugins by name is the project's
  business, in its own configuration);
- `-c` / `--config-file` and `--rootdir` (another configuration or root changes node ids and
  may drop the project's own settings the report relies on);
- `--basetemp` (pytest empties that directory first: `--basetemp=/ci` deletes the job);
- `-o` / `--override-ini` of `addopts` (smuggles any of the above in) or of `junit_*`;
- `@file` (pytest 8.2+ reads more arguments from a file, unchecked).

argparse accepts unambiguous prefixes of long options, so a prefix of a refused option
(`--junit`) is refused too, and short options are read inside clusters (`-xvpno:junitxml`).
The count and total length are bounded: they travel in a form field and a container's argv.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ci_common.errors import InvalidInput

MAX_ARGS = 64
MAX_TOTAL_CHARS = 4096  # all arguments together

_REFUSED_LONG = ("--junitxml", "--junit-xml", "--junit-prefix", "--config-file", "--rootdir",
                 "--basetemp")
_OVERRIDE_LONG = "--override-ini"
_REFUSED_SHORT = frozenset("pc")
_OVERRIDE_SHORT = "o"
# Short options of pytest (and common plugins) that take a value: in a cluster, what follows
# one of them is its value, not more options. An unknown letter is read as a flag, so a
# cluster is, if anything, refused too eagerly, never too late.
_VALUE_SHORT = frozenset("kmrWnopc")
_REFUSED_INI_PREFIXES = ("addopts", "junit_")


def _refuse(arg: str, why: str) -> InvalidInput:
    shown = arg if len(arg) <= 60 else arg[:57] + "..."
    return InvalidInput(f"pytest argument {shown!r} is not allowed: {why}")


def _check_override(arg: str, value: str) -> None:
    key = value.split("=", 1)[0].strip()
    if key.startswith(_REFUSED_INI_PREFIXES):
        raise _refuse(arg, f"the runner relies on {key!r} for its test report")


def _long_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def _is_prefix_of(name: str, option: str) -> bool:
    # "--" alone ends the options; argparse needs at least one letter to match a prefix.
    return len(name) > 2 and option.startswith(name)


def check_pytest_args(args: Sequence[str]) -> tuple[str, ...]:
    """The arguments as given, or InvalidInput (one line) naming the first refused one."""
    if len(args) > MAX_ARGS:
        raise InvalidInput(f"at most {MAX_ARGS} pytest arguments are allowed, not {len(args)}")
    total = sum(len(arg) for arg in args)
    if total > MAX_TOTAL_CHARS:
        raise InvalidInput(f"pytest arguments may be at most {MAX_TOTAL_CHARS} characters "
                           f"together, not {total}")
    after_double_dash = False
    expect_override = False
    for arg in args:
        if not isinstance(arg, str):
            raise InvalidInput("pytest arguments must be strings")
        if "\x00" in arg:
            raise InvalidInput("a pytest argument may not contain a NUL character")
        if expect_override:
            expect_override = False
            _check_override(arg, arg)
            continue
        if after_double_dash:
            continue  # plain paths from here on, as pytest reads them
        if arg.startswith("@"):
            raise _refuse(arg, "pytest would read more arguments from that file")
        if arg == "--":
            after_double_dash = True
        elif arg.startswith("--"):
            name = _long_name(arg)
            for option in _REFUSED_LONG:
                if _is_prefix_of(name, option):
                    raise _refuse(arg, f"{option} would defeat the runner's test report or "
                                       "the job's layout")
            if _is_prefix_of(name, _OVERRIDE_LONG):
                if "=" in arg:
                    _check_override(arg, arg.split("=", 1)[1])
                else:
                    expect_override = True
        elif arg.startswith("-") and len(arg) > 1:
            expect_override = _check_cluster(arg)
    return tuple(args)


def _check_cluster(arg: str) -> bool:
    """Check a short-option cluster; True when `-o`'s value is the next argument."""
    for index, letter in enumerate(arg[1:], start=1):
        if letter in _REFUSED_SHORT:
            what = "plugin loading" if letter == "p" else "another configuration file"
            raise _refuse(arg, f"-{letter} ({what}) would defeat the runner's test report")
        if letter == _OVERRIDE_SHORT:
            rest = arg[index + 1:]
            if not rest:
                return True
            _check_override(arg, rest)
            return False
        if letter in _VALUE_SHORT:
            return False
    return False


def pytest_args_to_json(args: Sequence[str]) -> str:
    """How the arguments are stored and sent: a JSON list of strings."""
    return json.dumps(list(args), ensure_ascii=False)


def pytest_args_from_json(text: str | None) -> tuple[str, ...]:
    """Parse a JSON list of strings (None or empty text: no arguments); InvalidInput if not."""
    if text is None or not text.strip():
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidInput("pytest_args must be a JSON list of strings") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput("pytest_args must be a JSON list of strings")
    return tuple(value)
