"""trainers/hub.py and launch/push.py against a local hub: the real huggingface_hub client, a server on 127.0.0.1.

`LocalHub` implements the endpoints huggingface_hub calls for create_repo, create_branch and create_commit
(validate-yaml, preupload, commit; repo_info and refs on the error paths), keeps repos and commits in memory,
records every request, and can answer chosen routes with an error status a given number of times.
"""
from __future__ import annotations

import base64
import json
import re
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from safetensors.torch import save_file

from launch.cli import run_cli
from launch.push import main as push_main
from trainers.config import dump_recipe, from_dict
from trainers.errors import UserError
from trainers.hub import card_for_repo, files_to_upload, push_folder, redact
from trainers.model_card import write_model_card

TOKEN = "hf_" + "Zq7" * 11 + "x"  # token-shaped, so the hf_... pattern is exercised too
REPO = "me/tiny-lora"
ROUTES = [  # (name, method, path pattern); repo ids are OWNER/NAME, revisions and branches URL-quoted
    ("create", "POST", r"/api/repos/create"),
    ("validate", "POST", r"/api/validate-yaml"),
    ("info", "GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?"),
    ("refs", "GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs"),
    ("branch", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)"),
    ("preupload", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)"),
    ("commit", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)"),
]


class LocalHub:
    """An in-memory model hub on 127.0.0.1; every file is committed as a regular (base64) file, so no LFS."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.requests: list[dict] = []    # {route, method, path, headers, body}
        self.repos: dict[str, dict] = {}  # repo id -> {private, branches: {name: {path: bytes}}}
        self.commits: list[dict] = []     # {repo, revision, summary, files: {path: bytes}}
        self.failures: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, route: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests to `route` with `status`."""
        self.failures.setdefault(route, []).extend([status] * times)

    def routes(self) -> list[str]:
        return [r["route"] for r in self.requests]

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        from huggingface_hub.utils import close_session

        close_session()  # drop pooled keep-alive connections to this port
        self.server.shutdown()
        self.server.server_close()

    # ---- endpoints: each returns (status, json body, extra headers) ----

    def create(self, body: dict, m: dict):
        repo = f"{body['organization']}/{body['name']}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}, {}
        self.repos[repo] = {"private": body.get("visibility") == "private", "branches": {"main": {}}}
        return 200, {"url": f"{self.url}/{repo}", "name": repo, "id": uuid.uuid4().hex}, {}

    def validate(self, body: dict, m: dict):
        meta = body["content"].split("---\n")[1]  # the front matter between the first two ---
        if not isinstance(yaml.safe_load(meta), dict):
            return 400, {"errors": [{"message": "metadata is not a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def info(self, body, m: dict):
        if m["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 200, {"id": m["repo"], "sha": "0" * 40, "private": self.repos[m["repo"]]["private"]}, {}

    def refs(self, body, m: dict):
        branches = self.repos.get(m["repo"], {}).get("branches", {})
        return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": "0" * 40}
                                  for b in branches], "converts": [], "tags": []}, {}

    def branch(self, body, m: dict):
        branches = self.repos[m["repo"]]["branches"]
        if m["rev"] in branches:
            return 409, {"error": "Reference already exists"}, {}
        branches[m["rev"]] = dict(branches["main"])
        return 200, {}, {}

    def preupload(self, body: dict, m: dict):
        missing = self._missing(m)
        if missing:
            return missing
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                               for f in body["files"]], "commitOid": "0" * 40}, {}

    def commit(self, raw: bytes, m: dict):
        missing = self._missing(m)
        if missing:
            return missing
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        header, files = lines[0], {}
        assert header["key"] == "header", header
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]  # no LFS asked for
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.repos[m["repo"]]["branches"][m["rev"]].update(files)
        oid = uuid.uuid4().hex + "0" * 8
        self.commits.append({"repo": m["repo"], "revision": m["rev"], "summary": header["value"]["summary"],
                             "files": files})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{m['repo']}/commit/{oid}"}, {}

    def _missing(self, m: dict):
        if m["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if m["rev"] not in self.repos[m["repo"]]["branches"]:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        return None

    def _answer(self, method: str, target: str, headers: dict, raw: bytes):
        path = urlsplit(target).path
        for name, verb, pattern in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                break
        else:
            name, match = "unknown", None
        m = {k: unquote(v) for k, v in (match.groupdict() if match else {}).items() if v is not None}
        with self.lock:
            self.requests.append({"route": name, "method": method, "path": path, "query": urlsplit(target).query,
                                  "headers": headers, "body": raw, "match": m})
            if name == "unknown":
                return 404, {"error": f"no route {method} {path}"}, {}
            if headers.get("authorization") != f"Bearer {self.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}, {}
            if self.failures.get(name):
                status = self.failures[name].pop(0)
                return status, {"error": f"injected {status}"}, {}
            if name == "commit":
                return self.commit(raw, m)
            return getattr(self, name)(json.loads(raw) if raw else {}, m)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def _serve(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, body, extra = hub._answer(self.command, self.path, headers, raw)
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **extra}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args):  # quiet: requests are recorded, not logged
                pass

        return Handler


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Nothing leaves 127.0.0.1: any other connection attempt fails the test."""
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running LocalHub; HF_ENDPOINT and HF_TOKEN point the client at it, no proxy, no telemetry."""
    with LocalHub() as server:
        point_at(monkeypatch, server.url, tmp_path)
        yield server


def point_at(monkeypatch, endpoint: str, tmp_path: Path, token: str | None = TOKEN) -> None:
    """Environment of a user whose HF_ENDPOINT is `endpoint`; the saved-login file is an empty temp path."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory whose final/ looks like a LoRA export, plus files that must not be uploaded."""
    run = tmp_path / "run"
    final = run / "final"
    (final / "unet").mkdir(parents=True)
    recipe = from_dict({"output_dir": str(run), "name": "tiny-lora", "model": {"pretrained": "org/base-model"},
                        "data": {"source": "data"}, "validation": {"prompts": ["a red seven"]}})
    torch.manual_seed(0)
    save_file({"lora_A": torch.randn(4, 8)}, final / "pytorch_lora_weights.safetensors")
    save_file({"lora_down": torch.randn(4, 8)}, final / "lora_kohya.safetensors")
    save_file({"w": torch.randn(2)}, final / "unet" / "diffusion_pytorch_model.safetensors")
    (final / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (final / "samples.png").write_bytes(b"\x89PNG fake grid")
    (final / "recipe.yaml").write_text(dump_recipe(recipe))
    usage = f"pipe.load_lora_weights({str(final)!r})\n"
    write_model_card(final, recipe, ("lora",), usage, "samples.png", trigger_words=("sks",))
    for junk in ("optimizer.bin", "notes.txt", "unet/old.png", ".cache/x.safetensors"):
        (final / junk).parent.mkdir(parents=True, exist_ok=True)
        (final / junk).write_bytes(b"junk")
    (run / "checkpoints").mkdir()
    return run


EXPECTED = ["README.md", "lora_kohya.safetensors", "pytorch_lora_weights.safetensors", "recipe.yaml",
            "samples.png", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def test_files_to_upload_are_what_users_load(run_dir):
    assert files_to_upload(run_dir / "final") == EXPECTED


def test_push_creates_branch_and_commits_once(hub, run_dir, capfd):
    final = run_dir / "final"
    url = push_folder(final, REPO, private=True, revision="exp/1", backoff_s=0)

    assert hub.routes() == ["create", "branch", "validate", "preupload", "commit"]
    create = json.loads(hub.requests[0]["body"])
    assert create == {"name": "tiny-lora", "organization": "me", "visibility": "private"}
    assert hub.requests[1]["path"] == "/api/models/me/tiny-lora/branch/exp%2F1"
    assert hub.requests[-1]["path"] == "/api/models/me/tiny-lora/commit/exp%2F1"
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)

    (commit,) = hub.commits
    assert commit["revision"] == "exp/1" and commit["summary"] == "Upload tiny-lora from difftune"
    assert url == f"{hub.url}/me/tiny-lora/commit/{url.rsplit('/', 1)[1]}"
    files = commit["files"]
    assert sorted(files) == EXPECTED
    for name in EXPECTED:
        if name != "README.md":
            assert files[name] == (final / name).read_bytes(), name
    card = files["README.md"].decode()
    assert card == card_for_repo((final / "README.md").read_text(), final, REPO)
    assert f"pipe.load_lora_weights('{REPO}')" in card and str(final) not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "org/base-model" and front["instance_prompt"] == "sks" and "lora" in front["tags"]

    out = capfd.readouterr()
    for text in (out.out, out.err, card, files["recipe.yaml"].decode(), (final / "recipe.yaml").read_text()):
        assert TOKEN not in text


def test_push_public_to_main_twice(hub, run_dir):
    first = push_folder(run_dir / "final", REPO, private=False, backoff_s=0)
    second = push_folder(run_dir / "final", REPO, private=False, backoff_s=0)

    assert first != second and len(hub.commits) == 2
    assert "branch" not in hub.routes()  # no revision: straight to main
    assert json.loads(hub.requests[0]["body"])["visibility"] == "public"
    assert hub.requests[-1]["path"] == "/api/models/me/tiny-lora/commit/main"
    assert hub.repos[REPO]["private"] is False


def test_refused_token_is_one_clear_line(hub, run_dir, monkeypatch, capfd):
    wrong = "hf_" + "W" * 34
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(UserError) as err:
        push_folder(run_dir / "final", REPO, backoff_s=0)

    message = str(err.value)
    assert "not allowed to write me/tiny-lora" in message and "HTTP 401" in message
    assert "set HF_TOKEN to a write token" in message and "refused" in message
    assert hub.routes() == ["create", "info"] and hub.commits == []  # create_repo(exist_ok) looks; no retry
    out = capfd.readouterr()
    assert wrong not in message + out.out + out.err


def test_missing_token_says_so(hub, run_dir, monkeypatch, tmp_path):
    point_at(monkeypatch, hub.url, tmp_path, token=None)
    with pytest.raises(UserError, match="no token was found; set HF_TOKEN to a write token"):
        push_folder(run_dir / "final", REPO, backoff_s=0)
    assert all("authorization" not in r["headers"] for r in hub.requests)


def test_503_then_success_is_retried(hub, run_dir, capfd):
    hub.fail("create", 503)
    hub.fail("commit", 503, times=2)
    url = push_folder(run_dir / "final", REPO, backoff_s=0)

    assert hub.routes().count("create") == 2 and hub.routes().count("commit") == 3
    assert len(hub.commits) == 1 and url.startswith(f"{hub.url}/me/tiny-lora/commit/")
    err = capfd.readouterr().err
    assert "create the repo on me/tiny-lora failed (HTTP 503); retry 1/3" in err
    assert "commit on me/tiny-lora failed (HTTP 503); retry 2/3" in err


def test_persistent_503_gives_up_after_the_tries(hub, run_dir):
    hub.fail("create", 503, times=10)
    with pytest.raises(UserError, match=r"create the repo on me/tiny-lora .* failed after 3 tries: HTTP 503"):
        push_folder(run_dir / "final", REPO, tries=3, backoff_s=0)
    assert hub.routes() == ["create"] * 3


def test_client_errors_are_not_retried(hub, run_dir):
    hub.fail("commit", 400)
    with pytest.raises(UserError, match="commit on me/tiny-lora .* failed: HTTP 400: injected 400"):
        push_folder(run_dir / "final", REPO, backoff_s=0)
    assert hub.routes().count("commit") == 1 and hub.commits == []


def test_unreachable_hub_is_retried_then_one_line(run_dir, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path)
    with pytest.raises(UserError, match=f"at http://127.0.0.1:{port} failed after 2 tries"):
        push_folder(run_dir / "final", REPO, tries=2, backoff_s=0)


def test_bad_repo_id_and_empty_folder(hub, tmp_path):
    with pytest.raises(UserError, match="not OWNER/NAME"):
        push_folder(tmp_path, "no-owner")
    with pytest.raises(UserError, match="no .safetensors weights"):
        push_folder(tmp_path, REPO)
    assert hub.requests == []


def test_redact_masks_tokens_headers_and_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    text = (f"token {TOKEN} header Authorization: Bearer {TOKEN[3:]} env plain-secret-value "
            "and a flag bearer standing by hf_short")
    masked = redact(text, "explicit-secret")
    assert TOKEN not in masked and TOKEN[3:] not in masked and "plain-secret-value" not in masked
    assert "hf_***" in masked and "Bearer ***" in masked
    assert "flag bearer standing by hf_short" in masked  # ordinary words survive
    assert redact("x explicit-secret y", "explicit-secret") == "x *** y"


# ---- launch/push.py ----

def test_push_cli_pushes_a_run_dir(hub, run_dir, capsys):
    assert run_cli(push_main, [str(run_dir), "--repo-id", REPO, "--private", "--revision", "v1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"{hub.url}/me/tiny-lora/commit/" + out.rsplit("/", 1)[1]
    assert hub.repos[REPO]["private"] is True and hub.commits[0]["revision"] == "v1"
    assert sorted(hub.commits[0]["files"]) == EXPECTED


def test_push_cli_takes_a_final_dir(hub, run_dir, capsys):
    assert run_cli(push_main, [str(run_dir / "final"), "--repo-id", REPO]) == 0
    assert hub.repos[REPO]["private"] is False and hub.commits[0]["revision"] == "main"


@pytest.mark.parametrize("case", ["missing", "no_final"])
def test_push_cli_bad_folder_exits_2(hub, run_dir, tmp_path, capsys, case):
    folder = tmp_path / "nope" if case == "missing" else run_dir
    if case == "no_final":
        import shutil

        shutil.rmtree(run_dir / "final")
    assert run_cli(push_main, [str(folder), "--repo-id", REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(folder) in err
    assert hub.requests == []


def test_push_cli_auth_error_exits_2_without_the_token(hub, run_dir, monkeypatch, capsys):
    wrong = "hf_" + "V" * 34
    monkeypatch.setenv("HF_TOKEN", wrong)
    assert run_cli(push_main, [str(run_dir), "--repo-id", REPO]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: hub: not allowed to write me/tiny-lora") and out.err.count("\n") == 1
    assert wrong not in out.out + out.err


def test_forbidden_branch_is_an_auth_error(hub, run_dir):
    hub.fail("branch", 403)
    with pytest.raises(UserError, match=r"not allowed to write me/tiny-lora .*\(HTTP 403\)"):
        push_folder(run_dir / "final", REPO, revision="exp", backoff_s=0)
    assert hub.routes() == ["create", "branch", "refs"]  # create_branch(exist_ok) looks for the branch first
