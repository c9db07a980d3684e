"""Push what users load (final/) to a model hub in one commit. Honours HF_ENDPOINT and HF_TOKEN.

The upload is `create_repo` (exist_ok), `create_branch` when a revision is named, then one `create_commit`
holding only the files people load. Transient failures (429, 5xx, dropped connections) are retried with
exponential backoff; anything else ends as a one-line UserError. The token is never printed: every message
that leaves this module goes through `redact`.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from trainers.errors import UserError
from trainers.integrity import refuse_nonfinite

T = TypeVar("T")

WEIGHTS = "*.safetensors"                            # at any depth: LoRA files, unet/, controlnet/, ...
TOP_LEVEL = ("README.md", "recipe.yaml", "*.png")    # card, resolved recipe, sample grid
LOADER_FILES = {                                     # what from_pretrained reads beside the weights, any depth
    "model_index.json", "config.json", "scheduler_config.json", "preprocessor_config.json",
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json", "merges.txt",
}
RETRY_STATUS = {408, 429, 500, 502, 503, 504}        # the statuses huggingface_hub itself treats as transient
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TOKEN_LIKE = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{16,}")      # hub tokens: hf_ and 34 letters/digits
_BEARER = re.compile(r"(?i)\b(bearer)\s+[\w.~+/=-]{16,}")          # an Authorization header value


def redact(text: str, *secrets: str | None) -> str:
    """`text` with the given secrets, HF_TOKEN's value, bearer headers and hf_... token-like strings masked."""
    env = (os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    for secret in (*secrets, *env):
        if secret and len(secret) >= 8:  # a very short "secret" would mask ordinary words
            text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1 ***", text)
    return _TOKEN_LIKE.sub(r"\1***", text)


def files_to_upload(folder: Path) -> list[str]:
    """Paths (relative, POSIX) of what users need: weights, loader configs, card, recipe, sample grids."""
    folder = Path(folder)
    picked = set(folder.rglob(WEIGHTS)) | {p for p in folder.rglob("*") if p.name in LOADER_FILES}
    for pattern in TOP_LEVEL:
        picked |= set(folder.glob(pattern))
    rel = {p.relative_to(folder).as_posix() for p in picked if p.is_file()}
    return sorted(r for r in rel if not any(part.startswith(".") for part in r.split("/")))


def card_for_repo(card: str, folder: Path, repo_id: str) -> str:
    """The card as the hub shows it: usage snippets that load the local final/ load `repo_id` instead."""
    folder = Path(folder)
    local = {str(folder), str(folder.resolve())}
    recipe = folder / "recipe.yaml"
    if recipe.is_file():  # the engine wrote the snippet with output_dir/final, which may be relative
        import yaml

        out = (yaml.safe_load(recipe.read_text()) or {}).get("output_dir")
        if out:
            local.add(str(Path(out) / "final"))
    for path in sorted(local, key=len, reverse=True):
        for q in "'\"":
            card = card.replace(f"{q}{path}{q}", f"{q}{repo_id}{q}")
    return card


def push_folder(folder: Path, repo_id: str, private: bool = True, revision: str | None = None,
                token: str | None = None, endpoint: str | None = None, *, tries: int = 4,
                backoff_s: float = 1.0) -> str:
    """Create `repo_id` if needed and commit the artefacts of `folder` in one commit; returns the commit URL.

    Args:
        folder: a final/ directory (weights, README.md, recipe.yaml, samples.png).
        private: visibility when the repo is created; an existing repo keeps its own.
        revision: branch to commit to, created from main when missing; None commits to main.
        token: None: huggingface_hub's lookup (HF_TOKEN, then the saved login).
        endpoint: None: HF_ENDPOINT as set now (huggingface_hub itself reads it once, at import), else the hub.
        tries, backoff_s: attempts per call on transient errors, and the first wait (doubling after each).
    Raises:
        UserError: a bad repo id, nothing to upload, refused credentials, or a hub error after the retries.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not REPO_ID.match(repo_id or ""):
        raise UserError(f"hub: repo id {repo_id!r} is not OWNER/NAME")
    files = files_to_upload(folder)
    if not any(f.endswith(".safetensors") for f in files):
        raise UserError(f"hub: {folder} holds no .safetensors weights; push a run's final/ directory")
    refuse_nonfinite(folder, f"hub: {folder} not pushed", files)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    call = _Caller(repo_id, api.endpoint, token, tries, backoff_s)
    call("create the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    if revision and revision != "main":
        call(f"create branch {revision!r}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    info = call("commit", lambda: api.create_commit(
        repo_id, operations=_operations(folder, files, repo_id, token), revision=revision,
        commit_message=f"Upload {_run_name(folder)} from difftune"))
    return info.commit_url


def _operations(folder: Path, files: list[str], repo_id: str, token: str | None) -> list:
    """Fresh CommitOperationAdds (a failed create_commit may have mutated the last ones); text is redacted."""
    from huggingface_hub import CommitOperationAdd

    ops = []
    for rel in files:
        path = folder / rel
        if rel == "README.md":
            content = redact(card_for_repo(path.read_text(), folder, repo_id), token).encode()
        elif rel == "recipe.yaml":
            content = redact(path.read_text(), token).encode()
        else:
            content = path
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    return ops


def _run_name(folder: Path) -> str:
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        import yaml

        return str((yaml.safe_load(recipe.read_text()) or {}).get("name") or folder.name)
    return folder.name


class _Caller:
    """Runs one hub call with retries on transient errors and turns failures into redacted UserErrors."""

    def __init__(self, repo_id: str, endpoint: str, token: str | None, tries: int, backoff_s: float):
        self.repo_id, self.endpoint, self.token = repo_id, endpoint, token
        self.tries, self.backoff_s = max(1, tries), backoff_s

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.tries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below; unknown errors are re-raised as they are
                status, transient = _classify(e)
                if transient and attempt < self.tries:
                    wait = self.backoff_s * 2 ** (attempt - 1)
                    print(f"hub: {what} on {self.repo_id} failed ({self._why(e, status)}); "
                          f"retry {attempt}/{self.tries - 1} in {wait:g} s", file=sys.stderr)
                    time.sleep(wait)
                    continue
                raise self._user_error(what, e, status, attempt) from None
        raise AssertionError("unreachable")

    def _why(self, e: Exception, status: int | None) -> str:
        if status is not None:
            return f"HTTP {status}"
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return redact(first.strip(), self.token)

    def _one_line(self, e: Exception) -> str:
        return redact(" ".join(str(e).split()), self.token)

    def _user_error(self, what: str, e: Exception, status: int | None, attempt: int) -> Exception:
        if status in (401, 403):
            who = ("no token was found" if not self._have_token()
                   else "the token was refused or cannot write there")
            return UserError(f"hub: not allowed to write {self.repo_id} at {self.endpoint} (HTTP {status}): {who}; "
                             f"set HF_TOKEN to a write token (https://huggingface.co/settings/tokens)")
        if status is None and isinstance(e, ValueError):  # card metadata rejected, a repo id refused, not JSON
            return UserError(f"hub: {what} on {self.repo_id} failed: {self._one_line(e)}")
        if status is None and not _is_transport_error(e):
            return e  # a bug here or in the client: keep its type and traceback
        tried = f" after {attempt} tries" if attempt > 1 else ""
        detail = redact(" ".join((getattr(e, "server_message", None) or "").split()), self.token)
        hint = " (is the repo id right, and may this token write to its owner?)" if status == 404 else ""
        return UserError(f"hub: {what} on {self.repo_id} at {self.endpoint} failed{tried}: "
                         f"{self._why(e, status)}{': ' + detail if detail else ''}{hint}")

    def _have_token(self) -> bool:
        if self.token:
            return True
        from huggingface_hub import get_token

        return get_token() is not None


def _classify(e: Exception) -> tuple[int | None, bool]:
    """(HTTP status or None, whether trying again may help)."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status, status in RETRY_STATUS
    return None, _is_transport_error(e)


def _is_transport_error(e: Exception) -> bool:
    """Connection refused/reset, timeouts, protocol errors: from httpx2/httpx (hub >= 1.0) or requests."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    names = {c.__module__.split(".")[0] + "." + c.__name__ for c in type(e).__mro__}
    return bool(names & {"httpx2.TransportError", "httpx.TransportError", "requests.ConnectionError",
                         "requests.Timeout"})
