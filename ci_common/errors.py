"""Every error the CI service raises on purpose, in one tree.

    CIError                      base; `message` is one line for the user, `exit_code` for CLIs
    ├── NotFound                 a user, key or job does not exist (or is not the caller's)
    ├── AlreadyExists            a user with that email exists
    ├── InvalidInput             the caller sent something unusable (exit 2, like a usage error)
    │   ├── InvalidArchive       an upload is not a safe zip of a project, or breaks a limit
    │   └── ProjectLayoutError   `ci submit` outside a project root (src/, tests/, requirements.txt)
    ├── TooLarge                 an upload or a packed project is over the size limit
    ├── Conflict                 the request clashes with the job's state (cancel a finished job)
    ├── AuthenticationError      missing, malformed, unknown or revoked key, or deactivated user
    ├── RateLimited              too many failed authentications from one address
    ├── ServerUnreachable        the client cannot reach any server (or the stream died for good)
    ├── ServerError              the server answered with an unexpected error
    ├── RuntimeUnavailable       the container engine does not answer (controller retries)
    ├── ControllerIdInUse        a live controller already holds this CI_CONTROLLER_ID
    ├── LeaseLost                a controller's write was refused: its lease was taken over
    └── DatabaseError            the database failed a request (PostgreSQL; never the password)
        └── DatabaseUnavailable  the database cannot be reached (down, refused, timed out)

Each CLI catches CIError in one place and prints `Error: <message>` to stderr.
"""

from __future__ import annotations


class CIError(Exception):
    """Base of every deliberate error; carries a one-line message and a CLI exit code."""

    default_message = "an error occurred"
    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class NotFound(CIError):
    default_message = "not found"


class AlreadyExists(CIError):
    default_message = "already exists"


class InvalidInput(CIError):
    default_message = "invalid input"
    exit_code = 2


class InvalidArchive(InvalidInput):
    default_message = "the upload is not a valid project archive"


class ProjectLayoutError(InvalidInput):
    default_message = "not a project root: src/, tests/ and requirements.txt are required"


class TooLarge(CIError):
    default_message = "too large"


class Conflict(CIError):
    default_message = "the request conflicts with the job's state"


class AuthenticationError(CIError):
    default_message = "invalid API key"


class RateLimited(CIError):
    default_message = "too many failed authentication attempts; try again later"


class ServerUnreachable(CIError):
    default_message = "cannot reach the CI server"


class ServerError(CIError):
    default_message = "the CI server answered with an error"


class RuntimeUnavailable(CIError):
    default_message = "the container engine is not available"


class ControllerIdInUse(CIError):
    default_message = "another live controller holds this controller id"


class LeaseLost(CIError):
    default_message = "this controller's lease was taken over by another controller"


class DatabaseError(CIError):
    default_message = "the database failed the request"


class DatabaseUnavailable(DatabaseError):
    default_message = "cannot reach the database"
