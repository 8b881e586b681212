"""Bearer tokens: made once, shown once, stored as their sha256.

A token is 32 random bytes, so a plain sha256 of it is as hard to reverse as the token is to guess; a slow
password hash would only slow every request down.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from seshu.errors import UserError
from seshu.federation.models import Client

ROLES = ("client", "worker", "admin")
TOKEN_PREFIX = "seshu_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def add_client(session: Session, name: str, role: str) -> tuple[Client, str]:
    """Register `name` with `role`; returns the row and the token, which is not kept anywhere."""
    name = name.strip()
    if not name or len(name) > 200:
        raise UserError("a client name must be 1 to 200 characters")
    if role not in ROLES:
        raise UserError(f"unknown role '{role}'; choose one of: {', '.join(ROLES)}")
    if session.scalar(select(Client.id).where(Client.name == name)) is not None:
        raise UserError(f"a client named '{name}' exists already; choose another name")
    token = new_token()
    client = Client(name=name, role=role, token_hash=hash_token(token))
    session.add(client)
    session.flush()
    return client, token


def client_for_token(session: Session, token: str) -> Client | None:
    return session.scalar(select(Client).where(Client.token_hash == hash_token(token)))
