"""`python -m ci_controller`: the same as the `ci-controller` command."""

from __future__ import annotations

from ci_controller.cli import main

if __name__ == "__main__":
    main()
