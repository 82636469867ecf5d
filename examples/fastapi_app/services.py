"""Reads and writes of users and projects, with their caching.

Reads are ``@cache.cached`` functions tagged with what they show: ``user:{id}`` (the
user), ``projects_of:{id}`` (the list of their projects), ``project:{id}`` (one project).
Their bodies read through the session's batching loader (``loader(session)``, see
:mod:`.loader`): a request asks for one id and runs the same single-row statements as
a direct query, through the query cache (``execution_options=CACHED``); a warming job
that refreshes the pages of 500 users at once in one session gets one query per kind
of row for all of them (:mod:`.warming`).
Writes commit (the query cache invalidates the rows and tables written before
``commit()`` returns) and then invalidate the tags of what they changed: renaming a
user invalidates every page showing that user, updating a project only the project's
page and its owner's page, which lists it.

The functions take the request's session and leave it out of their keys
(``ignore=("session",)``): a miss runs in the caller's task, on its session.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from .caching import cache, invalidate
from .db import writing
from .loader import CACHED, loader
from .models import Project, User
from .schemas import (
    ProjectCreate,
    ProjectOut,
    ProjectPage,
    ProjectUpdate,
    UserCreate,
    UserList,
    UserOut,
    UserPage,
    UserSummary,
    UserUpdate,
)

#: Tries of an update that lost an optimistic-locking race to a concurrent update.
ATTEMPTS: Final = 5


class Conflict(Exception):
    """The write could not be applied (a concurrent update kept winning, or a unique value is taken)."""


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------------- reads


@cache.cached(tags=["users", "user:{user_id}", "projects_of:{user_id}"], ignore=("session",))
async def get_user_page(session: AsyncSession, user_id: int) -> UserPage | None:
    """The user and their projects, or ``None`` (cached too: an unknown id costs one query)."""
    batch = loader(session)
    user = await batch.user(user_id)
    if user is None:
        return None
    return UserPage(user=user, projects=await batch.projects_of(user_id))


@cache.cached(tags=["users", "user:{user_id}"], ignore=("session",))
async def get_user_summary(session: AsyncSession, user_id: int) -> UserSummary | None:
    """What other pages show of a user."""
    user = await loader(session).user(user_id)
    return None if user is None else UserSummary(id=user.id, name=user.name, version=user.version)


@cache.cached(tags=["projects", "user:{user_id}", "project:{project_id}"], ignore=("session",))
async def get_project_page(session: AsyncSession, user_id: int, project_id: int) -> ProjectPage | None:
    """A project of ``user_id`` with its owner, or ``None``."""
    project = await loader(session).project(user_id, project_id)
    if project is None:
        return None
    owner = await get_user_summary(session, user_id)  # shared with every page showing this user
    if owner is None:
        return None
    return ProjectPage(project=project, owner=owner)


async def list_users(session: AsyncSession, offset: int, limit: int) -> UserList:
    """A page of the user directory: two statements through the query cache (tagged
    ``table:users`` automatically, so any committed user write refreshes them)."""
    page = select(User).order_by(User.id).offset(offset).limit(limit)
    users = (await session.execute(page, execution_options=CACHED)).scalars().all()
    total = (
        await session.execute(select(func.count()).select_from(User), execution_options=CACHED)
    ).scalar_one()
    return UserList(
        items=[UserSummary.model_validate(u) for u in users], total=total, offset=offset, limit=limit
    )


# ---------------------------------------------------------------------- writes


async def create_user(session: AsyncSession, data: UserCreate) -> UserOut:
    async with writing(session):  # SQLite: one writer at a time (db.writing)
        user = User(name=data.name, email=data.email, bio=data.bio, last_active_at=_now())
        session.add(user)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            raise Conflict(f"the email {data.email!r} is taken") from None
        # A page cached for this id while it did not exist (None) must go too.
        await invalidate([f"user:{user.id}", "user_lists"])
        return UserOut.model_validate(user)


async def update_user(session: AsyncSession, user_id: int, changes: UserUpdate) -> UserOut | None:
    async with writing(session):  # SQLite: one writer at a time (db.writing)
        for _ in range(ATTEMPTS):
            user = await session.get(User, user_id)  # not through the cache: writes read the database
            if user is None:
                return None
            for field, value in changes.model_dump(exclude_unset=True).items():
                setattr(user, field, value)
            user.last_active_at = _now()
            try:
                await session.commit()  # UPDATE ... WHERE id = ? AND version = ?
            except StaleDataError:  # a concurrent update of this user won: read it again
                await session.rollback()
                continue
            except IntegrityError:
                await session.rollback()
                raise Conflict("the email is taken") from None
            await invalidate([f"user:{user_id}", "user_lists"])
            return UserOut.model_validate(user)
        raise Conflict(f"user {user_id} is being updated concurrently; try again")


async def delete_user(session: AsyncSession, user_id: int) -> bool:
    async with writing(session):  # SQLite: one writer at a time (db.writing)
        user = await session.get(User, user_id)
        if user is None:
            return False
        await session.delete(user)  # its projects go with it (ON DELETE CASCADE)
        await session.commit()
        await invalidate([f"user:{user_id}", "user_lists"])
        return True


async def _owned_project(session: AsyncSession, user_id: int, project_id: int) -> Project | None:
    project = await session.get(Project, project_id)
    return project if project is not None and project.owner_id == user_id else None


async def create_project(session: AsyncSession, user_id: int, data: ProjectCreate) -> ProjectOut | None:
    async with writing(session):  # SQLite: one writer at a time (db.writing)
        if await session.get(User, user_id) is None:
            return None
        project = Project(owner_id=user_id, name=data.name, description=data.description)
        session.add(project)
        await session.commit()
        await invalidate([f"projects_of:{user_id}"])  # the user's page lists it
        return ProjectOut.model_validate(project)


async def update_project(
    session: AsyncSession, user_id: int, project_id: int, changes: ProjectUpdate
) -> ProjectOut | None:
    async with writing(session):  # SQLite: one writer at a time (db.writing)
        for _ in range(ATTEMPTS):
            project = await _owned_project(session, user_id, project_id)
            if project is None:
                return None
            for field, value in changes.model_dump(exclude_unset=True).items():
                setattr(project, field, value)
            try:
                await session.commit()
            except StaleDataError:
                await session.rollback()
                continue
            await invalidate([f"project:{project_id}", f"projects_of:{user_id}"])
            return ProjectOut.model_validate(project)
        raise Conflict(f"project {project_id} is being updated concurrently; try again")


async def delete_project(session: AsyncSession, user_id: int, project_id: int) -> bool:
    async with writing(session):  # SQLite: one writer at a time (db.writing)
        project = await _owned_project(session, user_id, project_id)
        if project is None:
            return False
        await session.delete(project)
        await session.commit()
        await invalidate([f"project:{project_id}", f"projects_of:{user_id}"])
        return True
