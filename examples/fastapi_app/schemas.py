"""What the API reads and returns (pydantic models; cached values keep their class)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ProjectOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    owner_id: int
    name: str
    description: str
    status: str
    version: int


class UserSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    version: int


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str
    bio: str
    last_active_at: datetime
    version: int


class UserPage(BaseModel):
    """``GET /api/v1/users/{user_id}``: the user and the projects they own."""

    user: UserOut
    projects: list[ProjectOut]


class ProjectPage(BaseModel):
    """``GET /api/v1/users/{user_id}/projects/{project_id}``: a project and its owner."""

    project: ProjectOut
    owner: UserSummary


class UserList(BaseModel):
    """``GET /api/v1/users``: one page of the user directory."""

    items: list[UserSummary]
    total: int
    offset: int
    limit: int


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    email: str = Field(min_length=3, max_length=200)
    bio: str = ""


class UserUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    email: str | None = Field(default=None, min_length=3, max_length=200)
    bio: str | None = None


class ProjectCreate(BaseModel):
    name: str = Field(min_length=1, max_length=120)
    description: str = ""


class ProjectUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=120)
    description: str | None = None
    status: str | None = Field(default=None, pattern="^(active|archived)$")
