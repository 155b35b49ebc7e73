"""Who may call the admin routes (``POST /v1/admin/reload``): the holder of a bearer token set at start.

Why off by default: a reload makes the process read a directory and swap the model, which no caller
on the network should trigger unless the operator said so. Without ``--admin-token`` (or
``RECSYS_ADMIN_TOKEN``) the admin routes answer 403; with one, a request needs
``Authorization: Bearer <token>`` (401 otherwise), compared in constant time so the answer's timing
does not tell how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.errors import ServiceError

ADMIN_PREFIX = "/v1/admin/"
_BEARER = HTTPBearer(auto_error=False, description="the service's --admin-token (RECSYS_ADMIN_TOKEN)")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="recsys-tt admin"'}


def check_admin(configured: SecretStr | None, presented: str | None) -> None:
    """Raise the answer for a request presenting ``presented`` (None: no bearer token) when ``configured`` is set."""
    if configured is None:
        raise ServiceError(403, "admin routes are off: start the service with --admin-token (or RECSYS_ADMIN_TOKEN)")
    if presented is None:
        raise ServiceError(401, "admin routes need the header 'Authorization: Bearer <--admin-token>'", CHALLENGE)
    if not hmac.compare_digest(presented.encode(), configured.get_secret_value().encode()):
        raise ServiceError(401, "wrong admin token", CHALLENGE)


async def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> None:
    """The dependency of every admin route."""
    check_admin(request.app.state.settings.admin_token, credentials.credentials if credentials else None)


Admin = Depends(require_admin)
