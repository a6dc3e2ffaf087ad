"""Modules loaded on first use, so `ci --help` does not pay for what only some commands need.

`ci` is started for every command; importing httpx and pydantic alone costs several tenths of a
second, more than the whole of `ci --help` should take (issue #10). The standard library's
`importlib.util.LazyLoader` makes a module object whose first attribute access runs the import.
For the single-threaded CLI only: Python 3.11's LazyLoader is not thread-safe, so library code
(client.py) imports inside its functions instead.
tests/unit/test_client_imports.py checks which modules each command loads.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """`name`, imported when one of its attributes is first used (at once if already loaded)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
