"""download.sh against a local server that signs URLs like Meta's CloudFront: full downloads, resume,
checksums, expired URLs and bad input, each with wget and with only curl on the PATH."""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "download.sh"
SECRET = b"test-signing-key"
KEY_PAIR_ID = "K15QRJLYKIFSLZ"
# Every external command download.sh may run, besides the downloader under test.
TOOLS = ["bash", "cat", "df", "grep", "mkdir", "mktemp", "mv", "rm", "tail", "tr"]


def _data(name: str, size: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _model_folder(tree: dict, remote: str, shards: int, with_tokenizer: bool) -> None:
    listed = {"params.json": json.dumps({"dim": 64, "n_layers": 2, "remote": remote}).encode()}
    if with_tokenizer:
        listed["tokenizer.model"] = _data(remote + "tok", 3000)
    for s in range(shards):
        listed[f"consolidated.{s:02d}.pth"] = _data(f"{remote}/{s}", 50_000 + 1000 * s)
    for name, data in listed.items():
        tree[f"{remote}/{name}"] = data
    tree[f"{remote}/checklist.chk"] = "".join(f"{_md5(d)}  {n}\n" for n, d in sorted(listed.items())).encode()


def llama2_tree() -> dict:
    tree = {"LICENSE": b"LLAMA 2 COMMUNITY LICENSE\n", "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy\n"}
    tree["tokenizer.model"] = _data("sp", 5000)
    tree["tokenizer_checklist.chk"] = f"{_md5(tree['tokenizer.model'])}  tokenizer.model\n".encode()
    for size, shards in (("7b", 1), ("13b", 2), ("70b", 8)):
        for suffix in ("", "-chat"):
            _model_folder(tree, f"llama-2-{size}{suffix}", shards, with_tokenizer=False)
    return tree


def llama3_tree() -> dict:
    tree = {"LICENSE": b"META LLAMA 3 COMMUNITY LICENSE\n", "USE_POLICY": b"Meta Llama 3 Acceptable Use Policy\n"}
    for remote, shards in (
        ("8b_pre_trained", 1),
        ("8b_instruction_tuned", 1),
        ("70b_pre_trained", 8),
        ("70b_instruction_tuned", 8),
    ):
        _model_folder(tree, remote, shards, with_tokenizer=True)
    return tree


def _cloudfront_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().translate(str.maketrans("+=/", "-_~"))


class FakeMeta:
    """A threaded HTTP server with Meta's signed-URL scheme, Range support, and counters of bytes sent."""

    def __init__(self, tree: dict):
        self.tree = dict(tree)
        self.corrupt: set[str] = set()
        self.drops: dict[str, int] = {}  # name -> how many more responses to cut off halfway
        self.sent: dict[str, int] = {}
        self.ranges: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, expires_in: int = 86400, signature: str | None = None) -> str:
        policy = json.dumps(
            {
                "Statement": [
                    {
                        "Resource": f"http://127.0.0.1:{self.port}/*",
                        "Condition": {"DateLessThan": {"AWS:EpochTime": int(time.time()) + expires_in}},
                    }
                ]
            }
        )
        policy_b64 = _cloudfront_b64(policy.encode())
        sig = signature or _cloudfront_b64(hmac.new(SECRET, policy_b64.encode(), "sha256").digest())
        query = urllib.parse.urlencode(
            {"Policy": policy_b64, "Signature": sig, "Key-Pair-Id": KEY_PAIR_ID, "Download-Request-ID": "1234567890"}
        )
        return f"http://127.0.0.1:{self.port}/*?{query}"

    def _authorised(self, query: dict) -> bool:
        try:
            policy_b64, sig = query["Policy"][0], query["Signature"][0]
            expected = _cloudfront_b64(hmac.new(SECRET, policy_b64.encode(), "sha256").digest())
            policy = json.loads(base64.b64decode(policy_b64.translate(str.maketrans("-_~", "+=/"))))
            expires = policy["Statement"][0]["Condition"]["DateLessThan"]["AWS:EpochTime"]
        except (KeyError, IndexError, ValueError):
            return False
        return (
            hmac.compare_digest(sig, expected) and query.get("Key-Pair-Id") == [KEY_PAIR_ID] and expires > time.time()
        )

    def _handler(self):
        meta = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                if not meta._authorised(urllib.parse.parse_qs(parts.query)):
                    body = (
                        b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>"
                    )
                    return self._reply(403, body, {"Content-Type": "text/xml"})
                name = urllib.parse.unquote(parts.path.lstrip("/"))
                if name not in meta.tree:
                    return self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "text/xml"})
                data = meta.tree[name]
                if name in meta.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start, status, headers = 0, 200, {"Accept-Ranges": "bytes"}
                rng = self.headers.get("Range")
                if rng and self.command == "GET":
                    with meta.lock:
                        meta.ranges.setdefault(name, []).append(rng)
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if self.command == "GET":
                    with meta.lock:
                        drop = meta.drops.get(name, 0) > 0
                        if drop:
                            meta.drops[name] -= 1
                        meta.sent[name] = meta.sent.get(name, 0) + ((len(body) + 1) // 2 if drop else len(body))
                    if drop:  # announce the whole length, send half of it, hang up
                        self.send_response(status)
                        for k, v in headers.items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: (len(body) + 1) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                self._reply(status, body, headers)

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def llama2():
    server = FakeMeta(llama2_tree())
    yield server
    server.close()


@pytest.fixture
def llama3():
    server = FakeMeta(llama3_tree())
    yield server
    server.close()


@pytest.fixture(params=["wget", "curl"])
def tool(request):
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed on this machine")
    return request.param


def run(
    tmp_path: Path, tool: str, args: list[str], stdin: str | None = None, env: dict | None = None, md5: str = "md5sum"
):
    """Run download.sh with a PATH holding only the tools it needs, one downloader and one md5 tool."""
    bindir = tmp_path / f"bin-{tool}-{md5}"
    if not bindir.exists():
        bindir.mkdir()
        for name in [*TOOLS, tool, md5]:
            found = shutil.which(name)
            if found is None:
                pytest.skip(f"{name} is not installed on this machine")
            (bindir / name).symlink_to(found)
    (tmp_path / "home").mkdir(exist_ok=True)
    full_env = {
        "PATH": str(bindir),
        "HOME": str(tmp_path / "home"),
        "LANG": "C",
        "TMPDIR": str(tmp_path),
        "no_proxy": "127.0.0.1",
    }
    full_env.update(env or {})
    return subprocess.run(
        [str(bindir / "bash"), str(SCRIPT), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def assert_has(target: Path, tree: dict, remote_to_local: dict) -> None:
    for remote, local in remote_to_local.items():
        path = target / local
        assert path.is_file(), f"{local} missing"
        assert path.read_bytes() == tree[remote], f"{local} differs from the server's {remote}"


def no_leftovers(target: Path) -> list[str]:
    return [str(p.relative_to(target)) for p in target.rglob("*") if p.suffix in (".part", ".bad")]


def test_llama2_selection_downloads_every_file_and_verifies(tmp_path, tool, llama2):
    target = tmp_path / "weights"
    r = run(tmp_path, tool, ["--url", llama2.url(), "--models", "7B,13B-chat", "--target-dir", str(target)])
    assert r.returncode == 0, r.stderr
    expected = {n: n for n in ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]}
    expected |= {n: n for n in llama2.tree if n.startswith(("llama-2-7b/", "llama-2-13b-chat/"))}
    assert_has(target, llama2.tree, expected)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(expected.values())
    assert sorted(llama2.sent) == sorted(expected), "each file fetched once, nothing else"
    assert "Done" in r.stderr and "--nproc_per_node 2 example_chat_completion.py" in r.stderr
    assert "Signature=" not in r.stdout + r.stderr, "the signed URL is a credential: keep it off the screen and logs"


def test_llama3_selection_saves_under_metas_folder_names(tmp_path, tool, llama3):
    target = tmp_path / "weights"
    # 70B alone is ambiguous (Llama 2 has one too); 8B-instruct tells the family.
    r = run(tmp_path, tool, ["--url", llama3.url(), "--models", "8B-instruct,70B", "--target-dir", str(target)])
    assert r.returncode == 0, r.stderr
    expected = {"LICENSE": "LICENSE", "USE_POLICY": "USE_POLICY"}
    for remote, local in (
        ("8b_instruction_tuned", "Meta-Llama-3-8B-Instruct"),
        ("70b_pre_trained", "Meta-Llama-3-70B"),
    ):
        expected |= {n: local + n.removeprefix(remote) for n in llama3.tree if n.startswith(remote + "/")}
    assert_has(target, llama3.tree, expected)
    assert len(list((target / "Meta-Llama-3-70B").glob("consolidated.*.pth"))) == 8
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(expected.values())


@pytest.mark.parametrize("have", [20_000, 50_000], ids=["part", "complete-but-not-renamed"])
def test_interrupted_download_resumes_from_the_partial_file(tmp_path, tool, llama2, have):
    target = tmp_path / "weights"
    name = "llama-2-7b/consolidated.00.pth"
    full = llama2.tree[name]
    assert len(full) == 50_000
    (target / "llama-2-7b").mkdir(parents=True)
    (target / (name + ".part")).write_bytes(full[:have])
    r = run(tmp_path, tool, ["--url", llama2.url(), "--models", "7B", "--target-dir", str(target)])
    assert r.returncode == 0, r.stderr
    assert llama2.ranges[name] == [f"bytes={have}-"]
    assert llama2.sent.get(name, 0) == len(full) - have
    assert (target / name).read_bytes() == full
    assert no_leftovers(target) == []


def test_dropped_connection_is_resumed_within_the_run(tmp_path, tool, llama2):
    target = tmp_path / "weights"
    name = "llama-2-7b/consolidated.00.pth"
    llama2.drops[name] = 1
    r = run(tmp_path, tool, ["--url", llama2.url(), "--models", "7B", "--target-dir", str(target)])
    assert r.returncode == 0, r.stderr
    assert llama2.ranges[name] == ["bytes=25000-"]
    assert llama2.sent[name] == 50_000
    assert (target / name).read_bytes() == llama2.tree[name]


def test_connection_that_keeps_dropping_leaves_only_a_part_file(tmp_path, llama2):
    # wget retries 20 times with growing waits on its own, too slow to test here; curl's retries are ours.
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    target = tmp_path / "weights"
    name = "llama-2-7b/consolidated.00.pth"
    llama2.drops[name] = 1000
    args = ["--url", llama2.url(), "--models", "7B", "--target-dir", str(target)]
    r = run(tmp_path, "curl", args)
    assert r.returncode != 0
    assert "attempt 5 of 5" in r.stderr and "network error while downloading llama-2-7b/consolidated.00.pth" in r.stderr
    assert not (target / name).exists()
    have = (target / (name + ".part")).stat().st_size
    assert 0 < have < 50_000
    llama2.drops.clear()
    llama2.ranges.clear()
    r = run(tmp_path, "curl", args)
    assert r.returncode == 0, r.stderr
    assert llama2.ranges[name] == [f"bytes={have}-"]
    assert (target / name).read_bytes() == llama2.tree[name]


def test_second_run_fetches_nothing_and_rechecks(tmp_path, tool, llama2):
    target = tmp_path / "weights"
    args = ["--url", llama2.url(), "--models", "7B", "--target-dir", str(target)]
    assert run(tmp_path, tool, args).returncode == 0
    llama2.sent.clear()
    r = run(tmp_path, tool, args)
    assert r.returncode == 0, r.stderr
    assert llama2.sent == {}
    # A finished file damaged afterwards is caught by the re-check and named, never silently kept.
    (target / "llama-2-7b/params.json").write_text("{}")
    r = run(tmp_path, tool, args)
    assert r.returncode != 0
    assert "llama-2-7b/params.json" in r.stderr and "rm " in r.stderr


def test_unfinished_file_from_metas_script_can_be_resumed_as_the_error_says(tmp_path, tool, llama2):
    # Meta's script writes straight to the final name, so an interrupted run leaves a short file there.
    target = tmp_path / "weights"
    name = "llama-2-7b/consolidated.00.pth"
    (target / "llama-2-7b").mkdir(parents=True)
    (target / name).write_bytes(llama2.tree[name][:30_000])
    args = ["--url", llama2.url(), "--models", "7B", "--target-dir", str(target)]
    r = run(tmp_path, tool, args)
    assert r.returncode != 0
    assert f"{name} does not match" in r.stderr and f"rename it to '{target / name}.part'" in r.stderr
    (target / name).rename(target / (name + ".part"))
    r = run(tmp_path, tool, args)
    assert r.returncode == 0, r.stderr
    assert llama2.ranges[name] == ["bytes=30000-"]
    assert (target / name).read_bytes() == llama2.tree[name]


def test_checksum_mismatch_names_the_file_and_never_keeps_it_under_its_name(tmp_path, tool, llama2):
    target = tmp_path / "weights"
    bad = "llama-2-13b/consolidated.01.pth"
    llama2.corrupt.add(bad)
    args = ["--url", llama2.url(), "--models", "13B", "--target-dir", str(target)]
    r = run(tmp_path, tool, args)
    assert r.returncode != 0
    assert f"{bad} failed its checksum" in r.stderr and "delete it" in r.stderr and "re-run" in r.stderr
    assert not (target / bad).exists() and not (target / (bad + ".part")).exists()
    assert (target / (bad + ".bad")).exists()
    # The other files still arrive, and a re-run once the user deleted the bad copy completes the set.
    assert (target / "llama-2-13b/consolidated.00.pth").read_bytes() == llama2.tree["llama-2-13b/consolidated.00.pth"]
    llama2.corrupt.clear()
    (target / (bad + ".bad")).unlink()
    r = run(tmp_path, tool, args)
    assert r.returncode == 0, r.stderr
    assert (target / bad).read_bytes() == llama2.tree[bad]


def test_openssl_checks_the_sums_where_md5sum_is_missing(tmp_path, any_tool, llama3):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed on this machine")
    target = tmp_path / "weights"
    bad = "Meta-Llama-3-8B/consolidated.00.pth"
    llama3.corrupt.add("8b_pre_trained/consolidated.00.pth")
    r = run(tmp_path, any_tool, ["--url", llama3.url(), "--models", "8B", "--target-dir", str(target)], md5="openssl")
    assert r.returncode != 0 and f"{bad} failed its checksum" in r.stderr
    assert (target / "Meta-Llama-3-8B/tokenizer.model").is_file() and not (target / bad).exists()


@pytest.mark.parametrize("how", ["expired", "wrong signature"])
def test_refused_url_says_it_expired_and_where_to_get_a_new_one(tmp_path, tool, llama2, how):
    url = llama2.url(expires_in=-60) if how == "expired" else llama2.url(signature="bm90LXZhbGlk")
    target = tmp_path / "weights"
    r = run(tmp_path, tool, ["--url", url, "--models", "7B", "--target-dir", str(target)])
    assert r.returncode != 0
    assert "403" in r.stderr and "expired or is wrong" in r.stderr
    assert "https://llama.meta.com/llama-downloads" in r.stderr
    assert not (target / "LICENSE").exists()
    assert "Signature=" not in r.stdout + r.stderr


def test_url_for_the_other_release_says_so(tmp_path, tool, llama3):
    # A Llama 3 URL with Llama 2 model names: the files are not there.
    r = run(tmp_path, tool, ["--url", llama3.url(), "--models", "7B", "--target-dir", str(tmp_path / "w")])
    assert r.returncode != 0
    assert "HTTP 404" in r.stderr and "another Llama release than Llama 2" in r.stderr


def test_unknown_model_lists_the_valid_names(tmp_path, tool, llama2):
    r = run(tmp_path, tool, ["--url", llama2.url(), "--models", "7B,9B", "--target-dir", str(tmp_path / "w")])
    assert r.returncode != 0
    assert "unknown model name '9B'" in r.stderr
    assert "7B,13B,70B,7B-chat,13B-chat,70B-chat" in r.stderr and "8B,8B-instruct,70B,70B-instruct" in r.stderr
    assert llama2.sent == {}


def test_no_server_says_network_error(tmp_path, tool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/*?Policy=x&Signature=y&Key-Pair-Id=z"
    r = run(tmp_path, tool, ["--url", url, "--models", "8B", "--target-dir", str(tmp_path / "w")])
    assert r.returncode != 0
    assert "network error" in r.stderr and "internet connection" in r.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full to fake a full disk")
def test_full_disk_says_no_space(tmp_path, tool, llama2):
    target = tmp_path / "weights"
    target.mkdir()
    (target / "LICENSE.part").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    r = run(tmp_path, tool, ["--url", llama2.url(), "--models", "7B", "--target-dir", str(target)])
    assert r.returncode != 0
    assert "could not write" in r.stderr and "no space left on device" in r.stderr and "--target-dir" in r.stderr
    assert not (target / "LICENSE").exists()


# The checks below do not depend on the downloader; they run once, with whichever is installed.
@pytest.fixture
def any_tool():
    for name in ("curl", "wget"):
        if shutil.which(name):
            return name
    pytest.skip("neither curl nor wget is installed")


def test_help(tmp_path, any_tool):
    r = run(tmp_path, any_tool, ["-h"])
    assert r.returncode == 0
    assert "--url" in r.stdout and "--models" in r.stdout and "--target-dir" in r.stdout and "--family" in r.stdout


def test_interactive_answers_on_stdin(tmp_path, any_tool, llama2):
    r = run(
        tmp_path, any_tool, [], stdin=f"  {llama2.url()}  \n7B-chat\n", env={"LLAMA_TARGET_DIR": str(tmp_path / "w")}
    )
    assert r.returncode == 0, r.stderr
    assert "Enter the URL" in r.stderr and "Enter the models" in r.stderr
    assert (tmp_path / "w/llama-2-7b-chat/consolidated.00.pth").is_file()


def test_environment_variables_replace_flags(tmp_path, any_tool, llama3):
    env = {"LLAMA_URL": llama3.url(), "LLAMA_MODELS": "8B", "LLAMA_TARGET_DIR": str(tmp_path / "w")}
    r = run(tmp_path, any_tool, [], env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w/Meta-Llama-3-8B/tokenizer.model").read_bytes() == llama3.tree[
        "8b_pre_trained/tokenizer.model"
    ]


def test_ambiguous_70b_asks_for_the_family(tmp_path, any_tool, llama2):
    target = tmp_path / "w"
    r = run(tmp_path, any_tool, ["--url", llama2.url(), "--models", "70B", "--target-dir", str(target)])
    assert r.returncode != 0 and "--family" in r.stderr
    assert llama2.sent == {}
    r = run(tmp_path, any_tool, ["--url", llama2.url(), "--models", "70B", "--target-dir", str(target)], stdin="2\n")
    assert r.returncode == 0, r.stderr
    assert len(list((target / "llama-2-70b").glob("consolidated.*.pth"))) == 8


@pytest.mark.parametrize(
    "models, family, message",
    [
        ("7B,8B", "", "mixes Llama 2 models (7B) and Llama 3 models (8B)"),
        (",", "", "no model names in ','"),
        ("8B", "2", "8B is Llama 3, but the family is Llama 2"),
        ("7B", "4", "unknown Llama family '4'"),
    ],
)
def test_inconsistent_family_is_refused(tmp_path, any_tool, llama2, models, family, message):
    r = run(
        tmp_path,
        any_tool,
        ["--url", llama2.url(), "--models", models, "--target-dir", str(tmp_path / "w")],
        env={"LLAMA_FAMILY": family},
    )
    assert r.returncode != 0 and message in r.stderr
    assert llama2.sent == {}


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://download.llamameta.net/llama-2-7b?Policy=x", "has no '*'"),
        ("download.llamameta.net/*?Policy=x", "must start with https://"),
    ],
)
def test_malformed_url_is_refused(tmp_path, any_tool, url, message):
    r = run(tmp_path, any_tool, ["--url", url, "--models", "7B", "--target-dir", str(tmp_path / "w")])
    assert r.returncode != 0 and message in r.stderr and "Meta's email" in r.stderr


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK), "download.sh should be executable"
    assert sys.platform == "win32" or SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
