"""Where the server's own log lines go when uvicorn serves it: beside uvicorn's, on stderr.

uvicorn configures only its own loggers. Without a handler of ours, `ci_server`'s INFO lines
(a client that left mid-upload) would go nowhere, and its errors would reach stderr through
logging's last-resort handler, without a level or a logger name. The level follows uvicorn's
(`--log-level`), so one option quiets both. Nothing changes when logging is configured already
(a `--log-config`, or pytest capturing): the root logger has handlers then.

python_multipart warns about every malformed body it parses ("Found invalid character …"):
that is the client's mistake, already answered 400 with the reason, and a bare line per bad
upload would let any client fill the log. Only its errors are kept.
"""

from __future__ import annotations

import logging

from uvicorn.logging import DefaultFormatter

SERVER_LOGGER = "ci_server"
MULTIPART_LOGGER = "python_multipart"
UVICORN_LOGGER = "uvicorn.error"
# uvicorn's own formatter ("INFO:     …"), so the two kinds of lines read alike.
LINE_FORMAT = "%(levelprefix)s %(name)s: %(message)s"


def log_beside_uvicorn() -> None:
    """Give the `ci_server` loggers a stderr handler at uvicorn's level, unless configured."""
    server_logger = logging.getLogger(SERVER_LOGGER)
    if server_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter(LINE_FORMAT))
    server_logger.addHandler(handler)
    server_logger.setLevel(logging.getLogger(UVICORN_LOGGER).getEffectiveLevel())
    logging.getLogger(MULTIPART_LOGGER).setLevel(logging.ERROR)
