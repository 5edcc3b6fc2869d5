"""Test helpers for knowledge bases: a small corpus in every supported format, a real
Chroma server on a free loopback port, and snapshots of what Chroma holds."""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tests.devserver import wait_until_up

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------- files


def make_pdf(pages: list[str], title: str = "") -> bytes:
    """A minimal, valid PDF with one line of Helvetica text per page (no PDF library needed)."""
    objects: list[bytes] = []
    n_pages = len(pages)
    page_ids = [3 + 2 * i for i in range(n_pages)]
    font_id = 3 + 2 * n_pages
    info_id = font_id + 1
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 11 Tf 72 720 Td ({escaped}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {page_ids[i] + 1} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects.append(f"<< /Title ({title}) >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {info_id} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def make_docx(paragraphs: list[tuple[str, str]], title: str = "") -> bytes:
    """A minimal .docx: (style, text) paragraphs, style "" or e.g. "Heading1"."""
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    body = []
    for style, text in paragraphs:
        ppr = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
        body.append(f"<w:p>{ppr}<w:r><w:t>{text}</w:t></w:r></w:p>")
    document = f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{w}"><w:body>{"".join(body)}</w:body></w:document>'
    core = (
        '<?xml version="1.0" encoding="UTF-8"?><cp:coreProperties '
        'xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" '
        f'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>{title}</dc:title></cp:coreProperties>'
    )
    content_types = (
        '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
        "</Types>"
    )
    rels = (
        '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>'
        "</Relationships>"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", content_types)
        archive.writestr("_rels/.rels", rels)
        archive.writestr("word/document.xml", document)
        archive.writestr("docProps/core.xml", core)
    return buffer.getvalue()


# query -> (file name, a check on the top hit)
QUERIES: dict[str, str] = {
    "How do I keep my sourdough starter alive?": "guide.md",
    "exoplanet transit photometry telescope": "manual.pdf",
    "how do honeybees tell each other where flowers are": "bees.html",
    "Which volcano is on the island of Sicily?": "notes.txt",
    "revenue growth from nordic subscriptions": "report.docx",
    "how can I reset my password": "faq.json",
    "chess olympiad in Budapest": "events.jsonl",
    "titanium bicycle frame stock": "inventory.csv",
}


def write_corpus(root: Path) -> Path:
    """Eight small documents, one per supported format, each on its own topic."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text(
        "Mount Etna is an active stratovolcano on the east coast of Sicily, Italy. "
        "It is one of the most active volcanoes in the world and erupts often.\n",
        encoding="utf-8",
    )
    (root / "guide.md").write_text(
        "# Sourdough Guide\n\n## Starter\n\nFeed the sourdough starter with equal parts flour and water "
        "every day and keep it at room temperature so the wild yeast stays alive.\n\n"
        "## Baking\n\nBake the loaf at 250 degrees in a preheated cast iron pot for forty minutes.\n",
        encoding="utf-8",
    )
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "bees.html").write_text(
        "<html><head><title>Honeybees</title><style>p{color:red}</style></head><body>"
        "<h1>Honeybees</h1><p>Honeybees live in colonies with a single queen.</p>"
        "<h2>Waggle dance</h2><p>Forager bees perform the waggle dance to tell their sisters the "
        "direction and distance of flowers with nectar.</p><script>var x = 1;</script></body></html>",
        encoding="utf-8",
    )
    (root / "manual.pdf").write_bytes(
        make_pdf(
            [
                "The Juno probe studies the gas giant Jupiter and its magnetic field from a polar orbit.",
                "The Kepler space telescope found exoplanets by transit photometry, watching stars dim.",
            ],
            title="Space Missions",
        )
    )
    (root / "report.docx").write_bytes(
        make_docx(
            [
                ("Title", "Annual Report"),
                ("Heading1", "Quarterly Revenue"),
                ("", "Revenue grew twelve percent, driven by the Nordic subscription business."),
                ("Heading1", "Staff"),
                ("", "The company hired forty engineers in Lisbon."),
            ],
            title="Annual Report",
        )
    )
    (root / "faq.json").write_text(
        json.dumps(
            [
                {"id": "q1", "title": "Password reset", "text": "To reset your password open Settings, choose Security and click Reset password."},
                {"id": "q2", "title": "Invoices", "text": "Invoices are emailed on the first day of each month."},
            ]
        ),
        encoding="utf-8",
    )
    (root / "events.jsonl").write_text(
        json.dumps({"title": "Chess Olympiad", "text": "The chess olympiad was held in Budapest with teams from 180 countries."})
        + "\n"
        + json.dumps({"title": "Marathon", "text": "The city marathon closes the river bridges every April."})
        + "\n",
        encoding="utf-8",
    )
    (root / "inventory.csv").write_text(
        "sku,item,warehouse,stock\nA1,titanium bicycle frame,Rotterdam,14\nB2,carbon fork,Hamburg,3\n",
        encoding="utf-8",
    )
    return root


def write_large_corpus(root: Path, documents: int = 24, big_paragraphs: int = 16) -> Path:
    """Enough chunks that ingestion takes seconds: many small documents and one long one."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["river", "mountain", "copper", "violin", "orbit", "harbor", "lantern", "meadow", "signal", "glacier", "quartz", "falcon", "cinnamon", "turbine", "archive", "compass", "velvet", "thunder", "saffron", "ledger", "canyon", "beacon"]
    for i in range(documents):
        sentences = []
        for j in range(6):
            picked = [words[(i * 7 + j * 3 + k) % len(words)] for k in range(9)]
            sentences.append(f"Document {i} sentence {j} mentions " + " ".join(picked) + ".")
        (root / f"doc{i:03d}.txt").write_text(" ".join(sentences), encoding="utf-8")
    paragraphs = [
        f"Paragraph {p} of the long handbook explains step {p} of the procedure in detail: "
        + " ".join(words[(p + k) % len(words)] for k in range(30))
        + "."
        for p in range(big_paragraphs)
    ]
    (root / "handbook.md").write_text("# Handbook\n\n" + "\n\n".join(paragraphs), encoding="utf-8")
    return root


# ---------------------------------------------------------------------------- chroma server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChromaServer:
    """`chroma run` on a free loopback port, started once per test session."""

    _instance: ChromaServer | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = free_port()
        chroma = VENV_BIN / "chroma"
        command = [str(chroma)] if chroma.exists() else [sys.executable, "-m", "chromadb.cli.cli"]
        self.log = open(path.parent / "chroma-server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*command, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
        )
        try:
            wait_until_up(self.process, f"http://127.0.0.1:{self.port}", path.parent / "chroma-server.log",
                          probe="/api/v2/heartbeat", timeout_s=60, poll_s=0.2)
        except RuntimeError:
            self.log.close()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    @classmethod
    def shared(cls, base: Path) -> ChromaServer:
        if cls._instance is None or cls._instance.process.poll() is not None:
            path = base / "chroma-server"
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            cls._instance = cls(path)
            atexit.register(cls._instance.stop)
        return cls._instance


def knowledge_overrides(backend: str, state: Path, server: ChromaServer | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {"state_dir": str(state)}
    if backend == "http":
        assert server is not None
        overrides["knowledge.chroma.mode"] = "http"
        overrides["knowledge.chroma.port"] = server.port
    return overrides


def toml_for(backend: str, server: ChromaServer | None, extra: str = "") -> str:
    text = ""
    if backend == "http":
        assert server is not None
        text += f'[knowledge.chroma]\nmode = "http"\nhost = "127.0.0.1"\nport = {server.port}\n'
    return text + extra


# ---------------------------------------------------------------------------- snapshots


def snapshot(service: Any, kb: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every chunk (id, text, metadata without timestamps) and every manifest record, sorted."""
    from lorag.knowledge.manifest import Manifest

    chunks, manifest = service.store.collections(kb)
    got = chunks.get(include=["documents", "metadatas"])
    rows = sorted(
        (
            chunk_id,
            text,
            tuple(sorted((k, v) for k, v in (meta or {}).items() if k != "ingested_at")),
        )
        for chunk_id, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)
    )
    records = sorted(
        (r.source, r.content_hash, r.n_chunks, r.state) for r in Manifest(manifest).all().values()
    )
    return rows, records


def assert_consistent(service: Any, kb: str) -> None:
    """No duplicates, no orphans: every chunk belongs to a committed document version, and
    every committed document has exactly its chunks."""
    rows, records = snapshot(service, kb)
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids))
    committed = {(source, content_hash): n for source, content_hash, n, state in records}
    assert all(state == "committed" for *_, state in records), records
    per_version: dict[tuple[str, str], int] = {}
    for _, _, meta in rows:
        meta_d = dict(meta)
        key = (meta_d["source"], meta_d["content_hash"])
        assert key in committed, f"orphan chunk of {key}"
        per_version[key] = per_version.get(key, 0) + 1
    assert per_version == {k: n for k, n in committed.items() if n}, (per_version, committed)


def hold_store_lock(state_dir: Path, **popen: Any) -> subprocess.Popen:
    """Another process holding the embedded store's lock; it prints 'held' once it has it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lorag.knowledge.store import StoreLock; "
            "StoreLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
            str(state_dir / "knowledge" / "chroma"),
        ],
        stdout=subprocess.PIPE,
        **popen,
    )
