"""Paths from API bodies stay inside the allowed roots: no `..`, no absolute escape, no symlink escape.

One function (lorag.paths.inside_roots) decides for every door; the server tests send
each escape to each path-taking endpoint of a real `lorag serve`: adapter registration
(POST /admin/adapters, roots: adapters.allowed_roots + the state dir) and server-side
knowledge ingestion (POST /v1/knowledge/{kb}/ingest, roots: knowledge.ingest.allowed_roots),
plus upload file names (POST /v1/knowledge/{kb}/documents), which never touch the disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lorag.paths import inside_roots
from tests.conftest import ADMIN_KEY, Models, Server, start_server

SECRET_TEXT = "The vault combination is zebra-4471; never index this line."


def test_inside_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "f").write_text("x")
    (root / "link").symlink_to(outside / "f")
    (root / "linkdir").symlink_to(outside)
    (root / "inner").symlink_to(root / "sub")  # a symlink that stays inside is fine
    (tmp_path / "root-evil").mkdir()  # shares a string prefix with the root, not a path prefix
    alias = tmp_path / "alias"
    alias.symlink_to(root)  # roots are resolved too
    assert inside_roots(root / "sub", [root]) == (root / "sub").resolve()
    assert inside_roots(root, [root]) == root.resolve()
    assert inside_roots(root / "inner", [root]) == (root / "sub").resolve()
    assert inside_roots(root / "sub", [alias]) == (root / "sub").resolve()
    assert inside_roots(str(root / "missing" / "file"), [root]) is not None  # a path need not exist yet
    for escape in (root / ".." / "outside" / "f", root / "sub" / ".." / ".." / "outside", outside / "f",
                   root / "link", root / "linkdir", root / "linkdir" / "f", tmp_path / "root-evil", Path("/etc")):
        assert inside_roots(escape, [root]) is None, escape
    assert inside_roots(root / "sub", []) is None


@dataclass
class Layout:
    server: Server
    allowed: Path  # knowledge.ingest.allowed_roots
    outside: Path  # not under any root: holds the secret file and an adapter copy
    links: Path  # a folder under the state dir (an allowed adapter root)


@pytest.fixture(scope="module")
def layout(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layout]:
    workdir = tmp_path_factory.mktemp("paths")
    allowed, outside, state = workdir / "allowed", workdir / "outside", workdir / "state"
    links = state / "links"
    for folder in (allowed, outside, links):
        folder.mkdir(parents=True)
    (allowed / "guide.md").write_text("# Guide\n\nSourdough starters want feeding twice a day.\n")
    (outside / "secret.md").write_text(f"# Secret\n\n{SECRET_TEXT}\n")
    (allowed / "link.md").symlink_to(outside / "secret.md")
    (allowed / "linkdir").symlink_to(outside)
    adapter = outside / "adapter"
    shutil.copytree(models.adapters["alpha"], adapter)
    (links / "escape").symlink_to(adapter)  # the whole directory points outside
    half = links / "half"  # the directory is inside, its weights are not
    half.mkdir()
    shutil.copy2(adapter / "adapter_config.json", half / "adapter_config.json")
    (half / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    (links / "inside").symlink_to(models.adapters["beta"])  # a symlink to another allowed root: fine
    extra = f'\n[knowledge.ingest]\nallowed_roots = ["{allowed}"]\n'
    srv = start_server(models, workdir, preload=False, state_dir=state, extra_config=extra)
    yield Layout(srv, allowed, outside, links)
    srv.stop()


@pytest.fixture
def admin_http(layout: Layout) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=layout.server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=120) as http:
        yield http


def error_of(response: httpx.Response) -> dict:
    return dict(response.json()["error"])


@pytest.mark.engine
def test_adapter_paths_are_confined(layout: Layout, models: Models, admin_http: httpx.Client) -> None:
    adapter = layout.outside / "adapter"
    escapes = {
        "dotdot": f"{models.root}/{os.path.relpath(adapter, models.root)}",  # root/../../.../outside/adapter
        "absolute": str(adapter),
        "symlinked-dir": str(layout.links / "escape"),
        "symlinked-weights": str(layout.links / "half"),
    }
    assert ".." in escapes["dotdot"]
    for name, path in escapes.items():
        response = admin_http.post("/admin/adapters", json={"name": f"evil-{name}", "path": path})
        assert response.status_code == 400, (name, response.text)
        error = error_of(response)
        assert error["code"] == "invalid_adapter" and "outside the allowed adapter roots" in error["message"], name
    registered = {row["name"] for row in admin_http.get("/admin/adapters").json()["data"]}
    assert not {n for n in registered if n.startswith("evil")}
    assert not list((layout.server.state_dir / "adapters").glob("evil*"))  # nothing copied in
    # A symlink that lands inside an allowed root is not an escape.
    ok = admin_http.post("/admin/adapters", json={"name": "via-link", "path": str(layout.links / "inside")})
    assert ok.status_code == 201, ok.text
    assert admin_http.delete("/admin/adapters/via-link").status_code == 200


@pytest.mark.engine
def test_ingest_paths_are_confined(layout: Layout, admin_http: httpx.Client) -> None:
    allowed, outside = layout.allowed, layout.outside
    escapes = {
        "dotdot": f"{allowed}/../outside/secret.md",
        "dotdot-missing": f"{allowed}/../outside/no-such-file.md",  # refused before existence is revealed
        "absolute": f"{outside}/secret.md",
        "absolute-dir": str(outside),
        "symlinked-file": f"{allowed}/link.md",
        "symlinked-dir": f"{allowed}/linkdir",
        "through-symlinked-dir": f"{allowed}/linkdir/secret.md",
        "glob-outside": f"{outside}/*.md",
        "glob-dotdot": f"{allowed}/../outside/*.md",
        "glob-symlinked-dir": f"{allowed}/linkdir/*.md",
        "relative": "secret.md",
    }
    for name, path in escapes.items():
        response = admin_http.post("/v1/knowledge/docs/ingest", json={"paths": [path], "create": True})
        assert response.status_code == 403, (name, response.text)
        assert error_of(response)["code"] == "path_not_allowed", name
    # Refused before anything was written: the knowledge base was never created.
    assert admin_http.get("/v1/knowledge/docs").status_code == 404

    # A folder (or glob) inside the root that holds a symlink out: the link is skipped, the rest ingested.
    for paths in ([str(allowed)], [f"{allowed}/*"]):
        report = admin_http.post("/v1/knowledge/docs/ingest", json={"paths": paths, "create": True})
        assert report.status_code == 200, report.text
        body = report.json()
        assert not any("secret" in source for source in body["added"] + body.get("updated", [])), body
        skipped = {item["source"]: item["kind"] for item in body["skipped"]}
        assert skipped.get(str(allowed / "link.md")) == "not_allowed", body
    hits = admin_http.post("/v1/knowledge/docs/query", json={"query": "vault combination zebra", "top_k": 5})
    assert hits.status_code == 200
    assert all(SECRET_TEXT not in hit["text"] for hit in hits.json()["hits"])
    assert {hit["source"] for hit in hits.json()["hits"]} <= {str(allowed / "guide.md")}


@pytest.mark.engine
def test_upload_names_cannot_traverse(layout: Layout, admin_http: httpx.Client) -> None:
    for filename in ("../../etc/passwd", "a/../../b.md", ".."):
        response = admin_http.post("/v1/knowledge/docs/documents", data={"create": "true"},
                                   files=[("files", (filename, b"# x\n\nhello\n", "text/markdown"))])
        assert response.status_code == 400, (filename, response.text)
        assert error_of(response)["code"] == "invalid_ingest_input"
