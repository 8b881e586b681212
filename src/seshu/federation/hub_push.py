"""`seshu server release --push-to-hub REPO`: a published release uploaded to a Hub model repository, tagged
`v<N>`, so that anyone can load a version with `from_pretrained(REPO, revision="vN")`."""

from __future__ import annotations

from typing import Any

from seshu.errors import UserError
from seshu.federation.layout import Federation
from seshu.federation.models import Release


def push_release(fed: Federation, version: int, repo: str, api: Any = None) -> str:
    """Upload release `version` to `repo` (created if needed) and tag the commit; returns the commit id. `api`
    is a `huggingface_hub.HfApi` (made here by default; tests pass their own)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from seshu.errors import first_line

    with fed.db.read() as session:
        row = session.get(Release, version)
    if row is None:
        raise UserError(f"release v{version} not found")
    folder = fed.unpack(row.manifest_sha256, "releases")
    api = api or HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        # delete_patterns="*": the commit holds exactly this release's files (the Hub keeps .gitattributes), not
        # also those of whatever version was pushed before it.
        commit = api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            commit_message=f"Seshu federation release v{version}",
            delete_patterns="*",
        )
        oid = getattr(commit, "oid", None) or str(commit)
        api.create_tag(repo, tag=f"v{version}", revision=oid, tag_message=f"release v{version}")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"{repo}: pushing v{version} to the Hub failed: {first_line(exc)}") from None
    return str(oid)
