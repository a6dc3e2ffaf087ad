"""The `ci` client: pack a project, submit it, stream its test output (HTTP only)."""
