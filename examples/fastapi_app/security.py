"""Who may use the cache management API: a bearer token from the ADMIN_TOKEN setting."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request


def bearer_token(token: str | None) -> Callable[[Request], bool]:
    """An ``authorize`` callable for ``cache_admin``: ``Authorization: Bearer <token>``.

    Without a configured token every request is refused (403): the management API can
    clear the cache, so it is never open by default.
    """
    expected = None if token is None else token.encode()

    def authorize(request: Request) -> bool:
        if expected is None:
            return False  # -> 403: ADMIN_TOKEN is not set
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(
                401, "invalid token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        return True

    return authorize
