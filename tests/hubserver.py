"""A local stand-in for the Hugging Face Hub, enough for ``snapshot_download``, ``hf_hub_download`` and
``HfApi.model_info`` / ``list_repo_tree`` pointed at it with ``HF_ENDPOINT=http://127.0.0.1:PORT``.

Routes (the ones ``huggingface_hub`` builds; see ``hf_api.py`` and ``file_download.py``):
    GET       /api/models/{org}/{name}/revision/{rev}        repo info: sha, siblings (sizes with ?blobs=True)
    GET       /api/models/{org}/{name}/tree/{rev}[/{path}]   recursive file listing (one page)
    HEAD/GET  /{org}/{name}/resolve/{rev}/{path}             a file, with X-Repo-Commit, ETag, X-Linked-Size

A repo is a dict path -> bytes at main, plus named revisions (``revisions``: e.g. ``refs/pr/66``, a safetensors
conversion PR, each its own :class:`FakeRepo` with its own files and commit); a revision is found by its name
(url-encoded as ``huggingface_hub`` sends it, ``refs%2Fpr%2F66``) or its commit. ``gated=True`` answers 401 without an ``Authorization`` header and 403 with
one (as the Hub does before the licence is accepted), except for a bearer token in ``tokens`` (a user who
accepted the licence). Every request is logged in ``HubServer.log`` so tests
can assert what was (not) fetched. Only binds 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 1024  # files at least this big are served as LFS files (sha256 ETag), like the Hub's rule


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    commit: str = ""
    tokens: frozenset[str] = frozenset()  # bearer tokens that may read a gated repo
    revisions: dict[str, "FakeRepo"] = field(default_factory=dict)  # named revisions other than main

    def __post_init__(self):
        if not self.commit:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + hashlib.sha1(self.files[path]).digest())
            self.commit = digest.hexdigest()

    @staticmethod
    def from_folder(folder: Path, extra: dict[str, bytes] | None = None, **kwargs) -> "FakeRepo":
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra or {})
        return FakeRepo(files, **kwargs)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}
    if len(data) >= LFS_THRESHOLD:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


@dataclass
class HubServer:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, path, had Authorization)

    def start(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fetched(self, suffix: str = "") -> list[str]:
        """Paths of file GETs (not HEADs) whose path ends with ``suffix``."""
        return [p for m, p, _ in self.log if m == "GET" and "/resolve/" in p and p.endswith(suffix)]

    # --- request handling -------------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        raw = urlsplit(req.path).path
        path = unquote(raw)
        authorization = req.headers.get("Authorization") or ""
        authorized = bool(authorization)
        self.log.append(("HEAD" if head else "GET", path, authorized))
        # split before unquoting: a revision is one segment even when it holds slashes (refs%2Fpr%2F66)
        parts = [unquote(part) for part in raw.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, kind, rev, rest = "/".join(parts[2:4]), parts[4], parts[5], "/".join(parts[6:])
            repo = self._access(req, repo_id, rev, authorization)
            if repo is None:
                return
            if kind == "revision":
                siblings = [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"],
                             **({"lfs": {"size": e["lfs"]["size"], "sha256": e["lfs"]["oid"],
                                         "pointerSize": 134}} if "lfs" in e else {})}
                            for e in (_entry(p, d) for p, d in sorted(repo.files.items()))]
                return self._json(req, {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                                        "gated": "manual" if repo.gated else False, "siblings": siblings,
                                        "tags": ["diffusers"]}, head)
            if kind == "tree":
                entries = [_entry(p, d) for p, d in sorted(repo.files.items()) if p.startswith(rest)]
                return self._json(req, entries, head)
            return self._error(req, 404, "EntryNotFound", "unknown api route")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, file_path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._access(req, repo_id, rev, authorization)
            if repo is None:
                return
            if file_path not in repo.files:
                return self._error(req, 404, "EntryNotFound", f"{file_path} not found")
            data = repo.files[file_path]
            entry = _entry(file_path, data)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            req.send_response(200)
            req.send_header("Content-Type", "application/octet-stream")
            req.send_header("Content-Length", str(len(data)))
            req.send_header("X-Repo-Commit", repo.commit)
            req.send_header("ETag", f'"{etag}"')
            if "lfs" in entry:
                req.send_header("X-Linked-Size", str(len(data)))
                req.send_header("X-Linked-Etag", f'"{etag}"')
            req.end_headers()
            if not head:
                req.wfile.write(data)
            return
        self._error(req, 404, "RepoNotFound", "unknown route")

    def _access(self, req, repo_id: str, rev: str, authorization: str) -> FakeRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, 404, "RepoNotFound", f"Repository Not Found for url: {req.path}.")
            return None
        if repo.gated and authorization.removeprefix("Bearer ").strip() not in repo.tokens:
            if not authorization:
                self._error(req, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be "
                                                   "authenticated to access it.")
            else:
                self._error(req, 403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                                                   "the authorized list. Visit the model page to ask for access.")
            return None
        if rev in ("main", repo.commit):
            return repo
        found = next((r for name, r in repo.revisions.items() if rev in (name, r.commit)), None)
        if found is None:
            self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return found

    @staticmethod
    def _json(req, document, head: bool) -> None:
        body = json.dumps(document).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    @staticmethod
    def _error(req, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)
