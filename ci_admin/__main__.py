"""`python -m ci_admin`: the same command as the `ci-admin` console script."""

from __future__ import annotations

from ci_admin.cli import main

if __name__ == "__main__":
    main()
