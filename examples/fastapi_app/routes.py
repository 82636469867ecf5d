"""The HTTP API. The read endpoints' responses are cached by the response cache (paths and
tags in ``RESPONSE_RULES``); writes call the services, which invalidate what they changed
(and the response cache drops the written URL by itself)."""

from __future__ import annotations

from typing import Annotated, Final, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from . import services
from .db import get_session
from .schemas import (
    ProjectCreate,
    ProjectOut,
    ProjectPage,
    ProjectUpdate,
    UserCreate,
    UserList,
    UserOut,
    UserPage,
    UserUpdate,
)

Session = Annotated[AsyncSession, Depends(get_session)]

router = APIRouter(prefix="/api/v1")

#: GET paths whose responses ResponseCacheMiddleware stores, with their tags (templates of
#: the named groups), the same as the functions behind them (services.py). Every entry also
#: carries ``url:<path>``. Updating a user invalidates ``user:<id>``: their page and their
#: project pages (which show the owner); a project write ``project:<id>`` and
#: ``projects_of:<owner id>`` (the owner's page lists the projects).
#:
#: Path rules rather than ``@responses.cached`` marks on the endpoints: the middleware
#: finds marks only on routes the app's router holds itself, and FastAPI 0.165 keeps an
#: included APIRouter as one nested route, where marks go unseen (nothing is cached).
RESPONSE_RULES: Final = {
    r"/api/v1/users": ["user_lists"],
    r"/api/v1/users/(?P<user_id>\d+)": ["users", "user:{user_id}", "projects_of:{user_id}"],
    r"/api/v1/users/(?P<user_id>\d+)/projects/(?P<project_id>\d+)": [
        "projects",
        "user:{user_id}",
        "project:{project_id}",
    ],
}


T = TypeVar("T")


def _found(value: T | None, what: str) -> T:
    if value is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{what} not found")
    return value


def _conflict(exc: services.Conflict) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


# ---------------------------------------------------------------------- reads


@router.get("/users", response_model=UserList)
async def list_users(
    session: Session,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> UserList:
    return await services.list_users(session, offset, limit)


@router.get("/users/{user_id}", response_model=UserPage)
async def read_user(user_id: int, session: Session) -> UserPage:
    return _found(await services.get_user_page(session, user_id), "user")


@router.get("/users/{user_id}/projects/{project_id}", response_model=ProjectPage)
async def read_project(user_id: int, project_id: int, session: Session) -> ProjectPage:
    return _found(await services.get_project_page(session, user_id, project_id), "project")


# ---------------------------------------------------------------------- writes


@router.post("/users", response_model=UserOut, status_code=status.HTTP_201_CREATED)
async def create_user(data: UserCreate, session: Session) -> UserOut:
    try:
        return await services.create_user(session, data)
    except services.Conflict as exc:
        raise _conflict(exc) from None


@router.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: int, changes: UserUpdate, session: Session) -> UserOut:
    try:
        found = await services.update_user(session, user_id, changes)
    except services.Conflict as exc:
        raise _conflict(exc) from None
    return _found(found, "user")


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(user_id: int, session: Session) -> Response:
    if not await services.delete_user(session, user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "user not found")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/users/{user_id}/projects", response_model=ProjectOut, status_code=status.HTTP_201_CREATED)
async def create_project(user_id: int, data: ProjectCreate, session: Session) -> ProjectOut:
    return _found(await services.create_project(session, user_id, data), "user")


@router.patch("/users/{user_id}/projects/{project_id}", response_model=ProjectOut)
async def update_project(
    user_id: int, project_id: int, changes: ProjectUpdate, session: Session
) -> ProjectOut:
    try:
        found = await services.update_project(session, user_id, project_id, changes)
    except services.Conflict as exc:
        raise _conflict(exc) from None
    return _found(found, "project")


@router.delete("/users/{user_id}/projects/{project_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_project(user_id: int, project_id: int, session: Session) -> Response:
    if not await services.delete_project(session, user_id, project_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "project not found")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    return {"status": "ok"}
