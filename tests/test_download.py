"""Tests for llm.sources (sources.yaml parsing, fetch, run_download) against a real loopback HTTP server.

Run: python -m pytest -x -q tests/test_download.py

The fixture starts a threaded http.server on 127.0.0.1 (free port) whose routes are scripted per
test: a list of responses per path (status, body, advertised length), the last one repeating.
Every request is recorded so tests can check what went over the wire.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llm.config import DownloadConfig
from llm.sources import (
    ChecksumError,
    DownloadError,
    Source,
    TransientDownloadError,
    fetch,
    load_sources,
    run_download,
)

BODY = ("I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough.\n" * 50).encode()
SPAM = b"ham\tGo until jurong point, crazy..\nspam\tFree entry in 2 a wkly comp to win FA Cup final tkts\n"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps names like "../evil" verbatim
    return buf.getvalue()


@dataclass
class Resp:
    status: int = 200
    body: bytes = b""
    length: int | None = None  # advertised Content-Length (default: len(body))


class Server:
    def __init__(self):
        self.routes: dict[str, list[Resp]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                queue = server.routes.get(self.path)
                if not queue:
                    self.send_error(404)
                    return
                r = queue.pop(0) if len(queue) > 1 else queue[0]
                self.send_response(r.status)
                self.send_header("Content-Length", str(r.length if r.length is not None else len(r.body)))
                self.end_headers()
                self.wfile.write(r.body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def route(self, path: str, *responses: Resp) -> str:
        self.routes[path] = list(responses)
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def src(url: str, data: bytes, file: str = "texts/verdict.txt", member: str | None = None, name: str = "verdict"):
    return Source(name=name, url=url, file=file, sha256=sha(data), member=member)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_success_and_hash(server, tmp_path):
    url = server.route("/v.txt", Resp(200, BODY))
    res = fetch(src(url, BODY), tmp_path, progress=False)
    assert res.path == tmp_path / "texts/verdict.txt" and res.path.read_bytes() == BODY
    assert (res.sha256, res.downloaded, res.changed, res.url, res.size) == (sha(BODY), True, False, url, len(BODY))
    assert leftovers(tmp_path) == ["texts/verdict.txt"]


def test_skip_when_present_makes_no_request(server, tmp_path):
    url = server.route("/v.txt", Resp(200, BODY))
    fetch(src(url, BODY), tmp_path, progress=False)
    assert server.requests == ["/v.txt"]
    res = fetch(src(url, BODY), tmp_path, progress=False)
    assert res.downloaded is False and server.requests == ["/v.txt"]


def test_500_then_success_is_retried(server, tmp_path):
    url = server.route("/v.txt", Resp(500, b"oops"), Resp(503, b"busy"), Resp(200, BODY))
    res = fetch(src(url, BODY), tmp_path, progress=False, retries=3, backoff=0.01)
    assert res.path.read_bytes() == BODY
    assert server.requests == ["/v.txt"] * 3


def test_500_forever_gives_up_cleanly(server, tmp_path):
    url = server.route("/v.txt", Resp(500, b"oops"))
    with pytest.raises(TransientDownloadError, match=r"source 'verdict': giving up after 3 tries: .*HTTP 500"):
        fetch(src(url, BODY), tmp_path, progress=False, retries=2, backoff=0.01)
    assert len(server.requests) == 3
    assert leftovers(tmp_path) == []


def test_truncated_body_is_retried_then_fails_cleanly(server, tmp_path):
    url = server.route("/v.txt", Resp(200, BODY[:100], length=len(BODY)), Resp(200, BODY))
    res = fetch(src(url, BODY), tmp_path, progress=False, backoff=0.01)
    assert res.path.read_bytes() == BODY and len(server.requests) == 2

    other = tmp_path / "other"
    url = server.route("/t.txt", Resp(200, BODY[:100], length=len(BODY)))
    with pytest.raises(TransientDownloadError, match=rf"truncated body \(100 of {len(BODY)} bytes\)"):
        fetch(src(url, BODY), other, progress=False, retries=1, backoff=0.01)
    assert leftovers(other) == []


def test_wrong_hash_error_and_no_file(server, tmp_path):
    url = server.route("/v.txt", Resp(200, BODY + b"edited"))
    s = src(url, BODY)
    with pytest.raises(ChecksumError) as e:
        fetch(s, tmp_path, progress=False)
    msg = str(e.value)
    assert "'verdict'" in msg and sha(BODY) in msg and sha(BODY + b"edited") in msg and "accept_changed" in msg
    assert leftovers(tmp_path) == []
    # Accepting the change keeps the file and reports the new hash.
    res = fetch(s, tmp_path, progress=False, accept_changed=True)
    assert res.changed and res.sha256 == sha(BODY + b"edited")
    assert res.path.read_bytes() == BODY + b"edited"


def test_zip_member_extracted_and_evil_zip_rejected(server, tmp_path):
    good = make_zip({"readme": b"about", "SMSSpamCollection": SPAM})
    url = server.route("/sms+spam+collection.zip", Resp(200, good))
    s = src(url, SPAM, file="SMSSpamCollection", member="SMSSpamCollection", name="sms")
    res = fetch(s, tmp_path, progress=False)
    assert res.path.read_bytes() == SPAM and res.sha256 == sha(SPAM) and res.bytes_fetched == len(good)
    assert leftovers(tmp_path) == ["SMSSpamCollection"]

    evil = make_zip({"SMSSpamCollection": SPAM, "../evil": b"pwned"})
    url = server.route("/evil.zip", Resp(200, evil))
    out = tmp_path / "raw2"
    with pytest.raises(ValueError, match=r"unsafe zip member '\.\./evil'"):
        fetch(src(url, SPAM, file="SMSSpamCollection", member="SMSSpamCollection"), out, progress=False)
    assert leftovers(out) == [] and not (tmp_path / "evil").exists()

    absolute = make_zip({"/etc/evil": b"pwned", "SMSSpamCollection": SPAM})
    url = server.route("/abs.zip", Resp(200, absolute))
    with pytest.raises(ValueError, match="unsafe zip member '/etc/evil'"):
        fetch(src(url, SPAM, file="SMSSpamCollection", member="SMSSpamCollection"), out, progress=False)

    url = server.route("/nomember.zip", Resp(200, make_zip({"other": b"x"})))
    with pytest.raises(ValueError, match=r"archive has no member 'SMSSpamCollection' \(members: \['other'\]\)"):
        fetch(src(url, SPAM, file="SMSSpamCollection", member="SMSSpamCollection"), out, progress=False)
    assert leftovers(out) == []


def test_mirror_folder_with_bare_file_or_zip(tmp_path):
    upstream = "https://archive.example.invalid/static/public/228/sms+spam+collection.zip"
    s = Source(name="sms_spam", url=upstream, file="SMSSpamCollection", sha256=sha(SPAM), member="SMSSpamCollection")
    bare = tmp_path / "mirror_bare"
    bare.mkdir()
    (bare / "SMSSpamCollection").write_bytes(SPAM)
    res = fetch(s, tmp_path / "raw1", mirror=str(bare), progress=False)
    assert res.path.read_bytes() == SPAM and res.url == str(bare / "SMSSpamCollection")

    zipped = tmp_path / "mirror_zip"
    zipped.mkdir()
    (zipped / "sms+spam+collection.zip").write_bytes(make_zip({"SMSSpamCollection": SPAM}))
    res = fetch(s, tmp_path / "raw2", mirror=f"file://{zipped}", progress=False)
    assert res.path.read_bytes() == SPAM and res.url == str(zipped / "sms+spam+collection.zip")

    with pytest.raises(FileNotFoundError, match="source 'sms_spam': not found at .*SMSSpamCollection.*sms\\+spam"):
        fetch(s, tmp_path / "raw3", mirror=str(tmp_path / "empty"), progress=False)


def test_mirror_base_url_falls_back_to_url_basename(server, tmp_path):
    server.route("/m/1342-0.txt", Resp(200, BODY))
    s = Source(name="pride", url="https://www.gutenberg.org/files/1342/1342-0.txt",
               file="gutenberg/Pride_and_Prejudice_JaneAusten.txt", sha256=sha(BODY))
    res = fetch(s, tmp_path, mirror=server.base + "/m/", progress=False)
    assert server.requests == ["/m/gutenberg/Pride_and_Prejudice_JaneAusten.txt", "/m/1342-0.txt"]
    assert res.url == server.base + "/m/1342-0.txt" and res.path.read_bytes() == BODY


def test_file_url_and_plain_path(tmp_path):
    f = tmp_path / "up stream" / "the-verdict.txt"
    f.parent.mkdir()
    f.write_bytes(BODY)
    res = fetch(src(f.as_uri(), BODY), tmp_path / "raw", progress=False)
    assert res.path.read_bytes() == BODY
    res = fetch(src(str(f), BODY, file="v2.txt"), tmp_path / "raw", progress=False)
    assert res.path.read_bytes() == BODY


def test_http_403_is_not_retried(server, tmp_path):
    url = server.route("/v.txt", Resp(403, b"no"))
    with pytest.raises(DownloadError, match="HTTP 403"):
        fetch(src(url, BODY), tmp_path, progress=False, retries=3, backoff=0.01)
    assert len(server.requests) == 1


def write_sources(path: Path, entries: list[dict]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"sources": entries}))
    return path


def test_run_download_manifest_metrics_and_unknown_name(server, tmp_path):
    url_a = server.route("/a.txt", Resp(200, BODY))
    url_z = server.route("/s.zip", Resp(200, make_zip({"SMSSpamCollection": SPAM})))
    yml = write_sources(tmp_path / "sources.yaml", [
        {"name": "a", "url": url_a, "file": "a.txt", "sha256": sha(BODY), "kind": "text"},
        {"name": "sms", "url": url_z, "file": "SMSSpamCollection", "member": "SMSSpamCollection",
         "sha256": sha(SPAM), "kind": "sms_spam"},
        {"name": "changed", "url": url_a, "file": "c.txt", "sha256": "0" * 64},
    ])
    raw = tmp_path / "raw"
    cfg = DownloadConfig(sources=["a", "sms", "changed"], accept_changed=["changed"])
    seen = []
    res = run_download(cfg, raw, progress=False, sources_path=yml, log=lambda m, s: seen.append((s, m)))
    assert res.outputs == {"a": raw / "a.txt", "sms": raw / "SMSSpamCollection", "changed": raw / "c.txt"}
    assert res.metrics == {"files_downloaded": 3, "files_skipped": 0, "sources_changed": 1,
                           "bytes_downloaded": 2 * len(BODY) + len(make_zip({"SMSSpamCollection": SPAM}))}
    assert [s for s, _ in seen] == [1, 2, 3]
    manifest = json.loads((raw / "download_manifest.json").read_text())
    assert res.artifacts == [raw / "download_manifest.json"]
    assert manifest["sources"]["a"] == {"url": url_a, "file": "a.txt", "sha256": sha(BODY), "expected_sha256": sha(BODY),
                                        "changed": False, "size": len(BODY), "kind": "text", "downloaded": True}
    assert manifest["sources"]["changed"]["sha256"] == sha(BODY) and manifest["sources"]["changed"]["changed"]
    assert json.loads(res.params["changed_sha256"]) == {"changed": sha(BODY)}

    n = len(server.requests)
    res = run_download(cfg, raw, progress=False, sources_path=yml)  # everything present: no network
    assert len(server.requests) == n
    assert res.metrics["files_skipped"] == 3 and res.metrics["sources_changed"] == 1
    assert json.loads((raw / "download_manifest.json").read_text())["sources"]["a"]["url"] == url_a

    with pytest.raises(ValueError, match=r"download.sources: unknown source 'nope' .*known sources: a, sms, changed"):
        run_download(DownloadConfig(sources=["a", "nope"]), raw, progress=False, sources_path=yml)


def test_load_sources_errors(tmp_path):
    good = {"name": "a", "url": "http://x/a.txt", "file": "a.txt", "sha256": "a" * 64, "kind": "text"}
    yml = tmp_path / "s.yaml"
    assert load_sources(write_sources(yml, [good]))["a"].file == "a.txt"
    cases = [
        ({**good, "sha256": "abc"}, r"source 'a' \(sources\[0\]\): field 'sha256': expected 64 hex digits"),
        ({**good, "kind": "video"}, r"field 'kind': expected one of text, sms_spam, instructions, preferences, got 'video'"),
        ({**good, "file": "../a.txt"}, r"field 'file': expected a relative path without '\.\.'"),
        ({k: v for k, v in good.items() if k != "url"}, r"field 'url': expected a non-empty string, got None"),
        ({**good, "urll": "x"}, r"unknown field\(s\) \['urll'\]"),
    ]
    for entry, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            load_sources(write_sources(yml, [entry]))
        assert str(yml) in str(e.value)
    with pytest.raises(ValueError, match=r"sources\[1\]\): duplicate source name 'a'"):
        load_sources(write_sources(yml, [good, good]))
    yml.write_text("sources: [\n")
    with pytest.raises(ValueError, match=r"s.yaml:\d+: invalid YAML"):
        load_sources(yml)
    with pytest.raises(FileNotFoundError, match="sources file not found"):
        load_sources(tmp_path / "missing.yaml")


def test_repo_sources_yaml():
    sources = load_sources(Path(__file__).parent.parent / "data" / "sources.yaml")
    assert {"the_verdict", "sms_spam", "instruction_data", "instruction_preference", "gutenberg_alice",
            "gutenberg_pride", "gutenberg_two_cities", "gutenberg_middlemarch", "gutenberg_moby_dick",
            "gutenberg_jane_eyre"} == set(sources)
    assert sources["instruction_preference"].kind == "preferences"
    assert sources["sms_spam"].member == "SMSSpamCollection" and sources["sms_spam"].kind == "sms_spam"
    assert sources["the_verdict"].sha256 == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
