"""Models shared by the SQLAlchemy integration tests: the shapes the query cache must
handle (joins, a column_property reading another table, a secondary table, joined
inheritance, a deferred column, many column types, ON DELETE CASCADE)."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Column,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Table,
    Time,
    Uuid,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, deferred, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Plan(enum.Enum):
    FREE = "free"
    PRO = "pro"


project_labels = Table(
    "project_labels",
    Base.metadata,
    Column("project_id", ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("label_id", ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True),
)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    budget: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0.00"))
    owner: Mapped[User] = relationship(back_populates="projects")
    labels: Mapped[list[Label]] = relationship(secondary=project_labels, order_by="Label.id")


class Label(Base):
    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200))
    is_active: Mapped[bool] = mapped_column(default=True)
    plan: Mapped[Plan] = mapped_column(Enum(Plan), default=Plan.FREE)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    birthday: Mapped[date | None] = mapped_column(Date, nullable=True)
    wakes_at: Mapped[time | None] = mapped_column(Time, nullable=True)
    session_length: Mapped[timedelta | None] = mapped_column(Interval, nullable=True)
    external_id: Mapped[uuid.UUID] = mapped_column(Uuid, default=uuid.uuid4)
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    bio: Mapped[str | None] = deferred(mapped_column(String(2000), nullable=True))
    projects: Mapped[list[Project]] = relationship(
        back_populates="owner", order_by=Project.id, passive_deletes=True
    )


# A column_property reading another table: select(User) reads "projects" too.
User.project_count = column_property(
    select(func.count(Project.id))
    .where(Project.owner_id == User.id)
    .correlate_except(Project)
    .scalar_subquery()
)


class Employee(Base):
    __tablename__ = "employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "managers"

    id: Mapped[int] = mapped_column(ForeignKey("employees.id", ondelete="CASCADE"), primary_key=True)
    reports: Mapped[int] = mapped_column(Integer, default=0)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "manager"}
