"""`ci` starts quickly: what a command does not need is not imported (issue #10).

Structural, not timed: each check runs a fresh interpreter and looks at `sys.modules`, so it
fails the moment someone adds a module-level `import httpx` (or anything that pulls in pydantic
or pathspec) on the way to `ci --help`, whatever the machine's speed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("httpx", "httpx_sse", "pydantic", "pydantic_core", "pathspec", "sqlite3", "psycopg")


def loaded_after(code: str) -> list[str]:
    """The HEAVY modules (or their submodules) a fresh interpreter has loaded after `code`."""
    probe = (f"import sys\n{code}\n"
             "import json\n"
             f"heavy = {HEAVY!r}\n"
             "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules"
             " if name.split('.')[0] in heavy})))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_no_http_client_nor_models() -> None:
    assert loaded_after("import ci_client.cli") == []


def test_ci_help_loads_no_http_client_nor_models() -> None:
    run_help = ("import contextlib, io\n"
                "from ci_client.cli import main\n"
                "sys.argv = ['ci', '--help']\n"
                "with contextlib.redirect_stdout(io.StringIO()), "
                "contextlib.suppress(SystemExit):\n"
                "    main()")
    assert loaded_after(run_help) == []


@pytest.mark.parametrize("command", ["list", "submit"])
def test_subcommand_help_loads_no_http_client_nor_models(command: str) -> None:
    run_help = ("import contextlib, io\n"
                "from ci_client.cli import main\n"
                f"sys.argv = ['ci', '{command}', '--help']\n"
                "with contextlib.redirect_stdout(io.StringIO()), "
                "contextlib.suppress(SystemExit):\n"
                "    main()")
    assert loaded_after(run_help) == []


def test_the_client_library_sends_before_it_loads_pydantic() -> None:
    # The upload of `ci submit test` needs httpx; the models are needed only for the answer.
    assert loaded_after("import ci_client.client") == ["httpx", "httpx_sse"]


def test_the_lazy_modules_load_on_first_use() -> None:
    assert "pydantic" in loaded_after("from ci_client import cli\ncli.render.jobs_table([])")
