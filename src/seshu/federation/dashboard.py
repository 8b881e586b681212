"""The coordinator's web page at `/`: how the model matures, release by release.

One self-contained page (no scripts or styles from elsewhere: a coordinator may run offline) that reads the
public summary at /api/v1/dashboard: every release with its scores on the frozen sets (drawn as one line per set
against the version), the contributions merged into each, and the state of every submission by blind id. An admin
who pastes a token sees who sent each decided submission, from the admin API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from seshu.federation.models import Client, Release, Submission


def summary(session: Session) -> dict[str, Any]:
    """What anyone may see: releases, their metrics and credited contributors; submissions by blind id only."""
    names = dict(session.execute(select(Client.id, Client.name)).tuples().all())
    subs = list(session.scalars(select(Submission).order_by(Submission.id)))
    releases = []
    for row in session.scalars(select(Release).order_by(Release.version)):
        merged = [s for s in subs if s.merged_in == row.version]
        releases.append(
            {
                "version": row.version,
                "parent": row.parent,
                "method": row.method,
                "created_at": row.created_at.isoformat(timespec="seconds"),
                "metrics": row.metrics,
                # A release credits its contributors by name in its card; the dashboard says the same.
                "contributions": [
                    {
                        "client": names.get(s.client_id),
                        "task": s.task,
                        "language": s.language,
                        "gains": s.gains,
                        "weight": s.weight,
                    }
                    for s in merged
                ],
            }
        )
    submissions = [
        {
            "blind_id": s.blind_id,
            "status": s.status,
            "task": s.task,
            "language": s.language,
            "release": s.release_version,
            "reason": s.reason if s.status == "rejected" else "",
        }
        for s in subs
    ]
    return {"releases": releases, "submissions": submissions}


def page() -> str:
    """The page itself (dashboard.html beside this module)."""
    return (Path(__file__).with_name("dashboard.html")).read_text(encoding="utf-8")
