"""Push what users load (final/) to a model hub in one commit. Honours HF_ENDPOINT and HF_TOKEN."""
from __future__ import annotations

from pathlib import Path

from trainers.errors import UserError

UPLOAD_PATTERNS = ["*.safetensors", "**/*.safetensors", "*.json", "**/*.json", "README.md", "*.png", "recipe.yaml"]


def push_folder(folder: Path, repo_id: str, private: bool = True, revision: str | None = None, api=None) -> str:
    """Create the repo if needed and upload the artefacts; returns the commit URL. The token is never printed."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 allow_patterns=UPLOAD_PATTERNS, commit_message="Upload from difftune")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"hub: not allowed to write {repo_id} (HTTP {status}); set HF_TOKEN to a write token") from None
        raise UserError(f"hub: pushing to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return getattr(info, "commit_url", str(info))
