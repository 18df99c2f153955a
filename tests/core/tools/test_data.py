"""encouraging_loss.tools.data: the table against MANIFEST.md, fetching (from a local mirror and from a
local HTTP server with Range support, never the internet), verification, the lookup order the
tests use, and a fresh clone of this working tree with no data: data-dependent tests skip naming
the fetch command, none errors, and EL_REQUIRE_DATA=1 fails the run."""
import dataclasses
import gzip
import hashlib
import html
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from encouraging_loss.tools import data as D

from confined import run_confined
from helpers import ROOT

BY_PATH = {f.path: f for f in D.FILES}


def run_cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "encouraging_loss.tools.data", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def verify_cache(monkeypatch, tmp_path) -> Path:
    """Each test remembers its hash checks in its own file (inherited by the commands it runs)."""
    path = tmp_path / "verified.json"
    monkeypatch.setenv("EL_VERIFY_CACHE", str(path))
    return path


def gunzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


# --- the table ---------------------------------------------------------------------------------------


def test_table_matches_the_manifest(shared_data):
    """Every file of shared/data/MANIFEST.md is in the table with its size and sha256, and nothing else."""
    manifest = shared_data / "MANIFEST.md"
    if not manifest.exists():  # data fetched into the cache holds the files, not the project's manifest
        pytest.skip(f"{manifest} absent: the data in use was fetched, not the shared copy with its manifest")
    rows, header = {}, []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "file":
            header = cells
        elif cells[0].startswith("data/") and cells[0].endswith(".gz"):
            rows[cells[0][len("data/"):]] = (int(cells[header.index("gz bytes")]),
                                            cells[header.index("sha256 (stored .gz)")])
    assert len(rows) == len(D.FILES) == 43
    assert set(rows) == set(BY_PATH)
    for path, (size, sha) in rows.items():
        assert (BY_PATH[path].size, BY_PATH[path].sha256) == (size, sha), path
    assert sum(f.size for f in D.FILES) == sum((shared_data / p).stat().st_size for p in BY_PATH)
    assert D.DATASETS == ("iwslt14-de-en", "iwslt17-fr-en", "mnist", "fashion-mnist", "multi30k-de-en")


def test_raw_hashes_are_those_of_the_stored_content(shared_data):
    for f in D.FILES:
        assert hashlib.sha256(gunzip(shared_data / f.dataset / f.name)).hexdigest() == f.raw_sha256, f.path


def test_only_upstream_gz_files_are_copies():
    copies = {f.path for f in D.FILES if f.how == "copy"}
    assert {f.dataset for f in D.FILES if f.how == "copy"} == {"mnist", "fashion-mnist", "multi30k-de-en"}
    assert "multi30k-de-en/valid.wmt16.de.gz" not in copies and len(copies) == 16
    for f in D.FILES:
        assert all(u.startswith(("https://", "http://")) for p in f.parts for u in p.urls), f.path
    assert "cannot be re-derived" in BY_PATH["iwslt14-de-en/train-sample.de.gz"].note


def test_segments_follow_the_prep_code():
    """The core's <seg> rule equals fairseq_el.prep_common's (the core may not import the plugin)."""
    from fairseq_el import prep_common as pc

    xml = ('<mteval>\n<doc docid="1">\n<url>http://x</url>\n'
           '<seg id="1">  Tom &amp; Jerry\t say  &quot;hi&quot; </seg>\n'
           '<seg id="22">a&lt;b &#39;c&#39;</seg>\n<description>no seg</description>\n'
           '<seg id="3">\u00e9t\u00e9  </seg>\n')
    ours = D._segments(xml)
    assert ours == [pc.unescape_segment(s) for s in pc.xml_segments(xml.splitlines())]
    assert ours == ['Tom & Jerry say "hi"', "a<b 'c'", "\u00e9t\u00e9"]


def test_derive_kinds():
    e = BY_PATH["iwslt14-de-en/train-sample.de.gz"]
    assert D.derive(e, [b"das ist ein be@@ isp@@ iel .\nkur@@ z\n"]) == b"das ist ein beispiel .\nkurz\n"
    trim = BY_PATH["multi30k-de-en/valid.wmt16.de.gz"]
    assert D.derive(trim, [b"a\nb\n\n"]) == b"a\nb\n"
    assert D.derive(BY_PATH["iwslt14-de-en/valid.de.gz"], [b"x\n", b"y\n"]) == b"x\ny\n"


# --- where the tests look ------------------------------------------------------------------------------


def complete_tree(root: Path, source: Path, copies=()) -> Path:
    """A complete copy of the data at ``root``: links to the files of ``source``, real copies (mtime
    kept) of the paths in ``copies``."""
    for f in D.FILES:
        (root / f.dataset).mkdir(parents=True, exist_ok=True)
        if f.path in copies:
            shutil.copy2(source / f.path, root / f.path)
        else:
            (root / f.path).symlink_to(source / f.path)
    return root


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EL_DATA", str(tmp_path / "el"))
    assert D.cache_dir() == tmp_path / "el"
    monkeypatch.delenv("EL_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.cache_dir() == tmp_path / "xdg" / "encouraging-loss" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.cache_dir() == tmp_path / "home" / ".cache" / "encouraging-loss" / "data"


def test_lookup_order(monkeypatch, tmp_path, shared_data):
    checkout = tmp_path / "work" / "repo"
    checkout.mkdir(parents=True)
    env_dir, shared, cache = tmp_path / "env", tmp_path / "work" / "shared" / "data", tmp_path / "cache"
    monkeypatch.setenv("EL_SHARED_DATA", str(env_dir))
    monkeypatch.setenv("EL_DATA", str(cache))
    assert D.data_dirs(checkout) == [("$EL_SHARED_DATA", env_dir), ("../shared/data", shared), ("cache", cache)]
    assert D.find_data(checkout=checkout) is None
    complete_tree(cache, shared_data)
    assert D.find_data(checkout=checkout) == cache
    complete_tree(shared, shared_data)
    assert D.find_data(checkout=checkout) == shared
    complete_tree(env_dir, shared_data)
    assert D.find_data(checkout=checkout) == env_dir
    (env_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: the next one is used
    assert [f.path for f in D.missing_files(env_dir)] == ["mnist/t10k-labels-idx1-ubyte.gz"]
    assert D.find_data(checkout=checkout) == shared
    assert D.find_data(["iwslt14-de-en"], checkout=checkout) == env_dir
    monkeypatch.delenv("EL_SHARED_DATA")
    assert [label for label, _ in D.data_dirs(checkout)] == ["../shared/data", "cache"]
    message = D.missing_data_message(checkout)
    assert "\n" not in message and message.endswith("run: el-data fetch")
    assert str(shared) in message and str(cache) in message


@pytest.mark.parametrize("value,on", [("", False), ("0", False), ("no", False), ("1", True), ("yes", True)])
def test_require_data(monkeypatch, value, on):
    monkeypatch.setenv("EL_REQUIRE_DATA", value)
    assert D.require_data() is on


def test_where_and_usage_errors(tmp_path):
    env = dict(os.environ, EL_DATA=str(tmp_path / "cache"), EL_SHARED_DATA=str(tmp_path / "nowhere"))
    out = run_cli("where", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "1. $EL_SHARED_DATA" in lines[1] and "[absent]" in lines[1]
    assert "2. ../shared/data" in lines[2] and "3. cache" in lines[3] and str(tmp_path / "cache") in lines[3]
    bad = run_cli("fetch", "--from", tmp_path / "nope", "--dest", tmp_path / "c", env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith(f"el-data: error: --from {tmp_path / 'nope'}: no such directory")
    assert run_cli("fetch", "--only", "cifar10", env=env).returncode == 2
    for flag in ("--connect-timeout", "--stall-timeout"):
        for value, why in (("0", "must be a positive number of seconds"), ("soon", "is not a number of seconds")):
            bad = run_cli("fetch", flag, value, "--dest", tmp_path / "c", env=env)
            assert bad.returncode == 2 and bad.stderr == (f"el-data fetch: error: argument "
                                                          f"{flag}: '{value}'{':' if value == '0' else ''} {why}\n")
    bad = run_cli("fetch", "--from", ROOT, "--dest", tmp_path / "c", env=dict(env, EL_FETCH_STALL_TIMEOUT="-1"))
    assert bad.returncode == 2 and bad.stderr == ("el-data: error: $EL_FETCH_STALL_TIMEOUT=-1: "
                                                  "must be a positive number of seconds\n")
    assert not (tmp_path / "c").exists()
    helps = run_cli("fetch", "--help", env=env).stdout
    assert "--only DATASET" in helps and "--from DIR" in helps
    assert "(default:" + str(tmp_path / "cache") in "".join(helps.split())


# --- the lookup checks hashes, and remembers them (issue 16, 3d) -----------------------------------------

LABELS = "mnist/t10k-labels-idx1-ubyte.gz"


def flip_byte(path: Path, at: int = 2000, keep_mtime: bool = True) -> None:
    """Change one byte of ``path`` in place: the same size and (``keep_mtime``) the same mtime as before."""
    st = path.stat()
    body = bytearray(path.read_bytes())
    body[at] ^= 1
    path.write_bytes(bytes(body))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_lookup_refuses_a_complete_but_corrupt_copy(monkeypatch, tmp_path, shared_data):
    """A complete copy with one byte changed (same size, same mtime) is named as corrupt, with the command
    that repairs it, and passed over; a file present only as ``.part`` counts as missing."""
    checkout = tmp_path / "work" / "repo"
    checkout.mkdir(parents=True)
    shared, cache = tmp_path / "work" / "shared" / "data", tmp_path / "cache"
    monkeypatch.delenv("EL_SHARED_DATA", raising=False)
    monkeypatch.setenv("EL_DATA", str(cache))
    complete_tree(shared, shared_data, copies=[LABELS])
    flip_byte(shared / LABELS)  # before anything was remembered: only the hash can tell
    assert D.missing_files(shared) == []  # presence alone takes it as complete
    missing, corrupt = D.check_dir(shared)
    assert missing == [] and [f.path for f, _ in corrupt] == [LABELS]
    assert corrupt[0][1].startswith("sha256 ") and f"expected {BY_PATH[LABELS].sha256} (4542 bytes" in corrupt[0][1]
    assert D.find_data(checkout=checkout) is None
    message = D.missing_data_message(checkout)
    assert message == (f"test data not usable (no complete, intact copy in {shared}, {cache}): {shared} is complete "
                       f"but holds 1 corrupt file ({LABELS}: wrong hash); repair it with: el-data fetch --dest "
                       f"{shared} --force (add --from DIR to copy them from a good copy instead)")
    assert D.find_data(["iwslt14-de-en"], checkout=checkout) == shared  # its other datasets are intact
    complete_tree(cache, shared_data)
    assert D.find_data(checkout=checkout) == cache  # the next complete, intact copy

    out = run_cli("where", env=dict(os.environ, EL_SHARED_DATA=str(shared)))
    assert out.returncode == 1 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[1] == f"  1. $EL_SHARED_DATA {shared}  [CORRUPT: 1 file with the wrong hash ({LABELS})]"
    assert sum("<- used" in x for x in lines) == 1 and "<- used" not in lines[1]
    assert (f"repair {shared} with: el-data fetch --dest {shared} --force (add --from DIR "
            f"to copy them from a good copy instead)") in lines

    (cache / LABELS).unlink()  # a partial download is not a file
    (cache / (LABELS + ".part")).write_bytes((shared_data / LABELS).read_bytes()[:1000])
    assert [f.path for f in D.check_dir(cache)[0]] == [LABELS] and D.find_data(checkout=checkout) is None


def test_lookup_remembers_what_it_hashed(monkeypatch, tmp_path, shared_data, verify_cache):
    """The second lookup reads no file; a file whose size, mtime, inode or ctime changed is hashed again."""
    root = complete_tree(tmp_path / "data", shared_data, copies=[LABELS])
    checkout = tmp_path / "repo"
    monkeypatch.setenv("EL_SHARED_DATA", str(root))
    monkeypatch.setenv("EL_DATA", str(tmp_path / "nothing"))

    def lookup():
        before = D.files_hashed
        found = D.find_data(checkout=checkout)
        return found, D.files_hashed - before

    assert lookup() == (root, 43)  # the first time: every file
    assert verify_cache.is_file()
    assert lookup() == (root, 0)  # then only stat calls
    labels = root / LABELS
    flip_byte(labels)  # edited, size and mtime put back: its ctime shows it
    assert lookup() == (None, 1)
    assert lookup() == (None, 0)  # the refusal is remembered too
    flip_byte(labels, keep_mtime=False)  # repaired, with a new mtime
    assert lookup() == (root, 1)
    st = labels.stat()
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only the mtime changes
    assert lookup() == (root, 1)
    assert lookup() == (root, 0)

    env = dict(os.environ, EL_SHARED_DATA=str(root))
    run_cli("where", env=env)
    again = run_cli("where", env=env)
    assert again.returncode == 0 and f"  1. $EL_SHARED_DATA {root}  [complete, verified]  <- used" in again.stdout
    assert again.stdout.splitlines()[-1].startswith("hash checks: 0 files hashed, ")


@pytest.mark.parametrize("damage", ["truncated", "array", "binary", "wrong-types", "old-version", "a-folder",
                                    "cannot-be-made"])
def test_a_damaged_or_unwritable_verify_cache_is_ignored(monkeypatch, tmp_path, shared_data, damage):
    root = complete_tree(tmp_path / "data", shared_data)
    cache_file = tmp_path / "cache" / "verified.json"
    cache_file.parent.mkdir()
    contents = {"truncated": b'{"version": 1, "files": {"', "array": b"[1, 2]", "binary": b"\xff\x00\x80garbage",
                "old-version": json.dumps({"version": 0, "files": {str(root / LABELS): {"problem": ""}}}).encode(),
                "wrong-types": json.dumps({"version": 1, "files": {str(root / LABELS): {"stat": "x", "problem": 5},
                                                                    "other": 7}}).encode()}
    if damage == "a-folder":
        cache_file.mkdir()
    elif damage == "cannot-be-made":
        cache_file = tmp_path / "a-file" / "verified.json"
        cache_file.parent.write_text("not a folder")
    else:
        cache_file.write_bytes(contents[damage])
    monkeypatch.setenv("EL_VERIFY_CACHE", str(cache_file))
    for _ in range(2):
        before = D.files_hashed
        missing, corrupt = D.check_dir(root, ["multi30k-de-en"])
        assert (missing, corrupt) == ([], [])
        hashed = D.files_hashed - before
    if damage in ("a-folder", "cannot-be-made"):
        assert hashed == sum(f.dataset == "multi30k-de-en" for f in D.FILES)  # no memory: hashed again, that is all
    else:
        assert hashed == 0  # rewritten at the first lookup
        assert json.loads(cache_file.read_text())["version"] == 1
    out = run_cli("where", env=dict(os.environ, EL_SHARED_DATA=str(root)))
    assert out.returncode == 0 and out.stderr == "" and "[complete, verified]  <- used" in out.stdout


# --- fetch --from and verify (offline) ------------------------------------------------------------------


def test_fetch_from_local_mirror_then_verify(shared_data, tmp_path):
    cache = tmp_path / "cache"
    out = run_cli("fetch", "--from", shared_data, "--dest", cache)
    assert out.returncode == 0, out.stderr
    total = sum(f.size for f in D.FILES)
    assert f"fetched 43 files, {total / 1e6:.1f} MB; already present 0 files" in out.stdout
    assert "  ok mnist/train-images-idx3-ubyte.gz: 9.9 MB" in out.stdout
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == sorted(BY_PATH)
    ok = run_cli("verify", "--dir", cache)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == f"43 ok, 0 missing, 0 corrupt in {cache}"
    again = run_cli("fetch", "--from", shared_data, "--dest", cache, "--only", "mnist")
    assert again.returncode == 0 and "fetched 0 files, 0 bytes; already present 4 files, 11.6 MB" in again.stdout

    labels = cache / "mnist" / "t10k-labels-idx1-ubyte.gz"  # truncated
    labels.write_bytes(labels.read_bytes()[:1000])
    code = cache / "iwslt14-de-en" / "code.gz"  # one byte altered (a text file: checked by content too)
    raw = bytearray(code.read_bytes())
    raw[5000] ^= 1
    code.write_bytes(bytes(raw))
    (cache / "multi30k-de-en" / "valid.en.gz").unlink()  # missing
    bad = run_cli("verify", "--dir", cache)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert lines[-1] == f"40 ok, 1 missing, 2 corrupt in {cache}"
    labels_line = next(x for x in lines if "t10k-labels" in x and "mnist/" in x)
    assert labels_line.startswith("CORRUPT  mnist/t10k-labels-idx1-ubyte.gz: sha256 ")
    assert f"expected {BY_PATH['mnist/t10k-labels-idx1-ubyte.gz'].sha256} (1000 bytes, expected 4542)" in labels_line
    code_line = next(x for x in lines if "code.gz" in x)
    assert code_line.startswith("CORRUPT  iwslt14-de-en/code.gz: ")
    missing = next(x for x in lines if "valid.en.gz" in x and "multi30k" in x)
    assert missing == ("MISSING  multi30k-de-en/valid.en.gz (source: https://raw.githubusercontent.com/multi30k/dataset/"
                       "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/val.en.gz; fetch it with "
                       "el-data fetch --only multi30k-de-en)")

    refused = run_cli("fetch", "--from", shared_data, "--dest", cache)
    assert refused.returncode == 1
    errors = refused.stderr.splitlines()
    assert len(errors) == 2 and all(e.startswith("el-data: error: ") for e in errors)
    assert "mnist/t10k-labels-idx1-ubyte.gz: present at" in errors[0] + errors[1]
    assert "--force" in errors[0] and "fetched 1 files" in refused.stdout  # the missing one came back
    assert labels.stat().st_size == 1000  # nothing overwritten without --force
    forced = run_cli("fetch", "--from", shared_data, "--dest", cache, "--force")
    assert forced.returncode == 0 and "replacing mnist/t10k-labels-idx1-ubyte.gz (sha256 " in forced.stdout
    assert run_cli("verify", "--dir", cache).returncode == 0


def test_fetch_from_a_mirror_that_lacks_a_file_or_holds_a_bad_one(shared_data, tmp_path):
    mirror = tmp_path / "mirror" / "mnist"
    mirror.mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_data / "mnist" / name, mirror / name)
    bad = mirror / "t10k-labels-idx1-ubyte.gz"
    body = bytearray(bad.read_bytes())
    body[2000] ^= 1
    bad.write_bytes(bytes(body))
    report = D.fetch(tmp_path / "cache", ["mnist"], source_dir=tmp_path / "mirror", log=lambda m: None)
    assert [(e.name, n) for e, n in report["fetched"]] == [("train-labels-idx1-ubyte.gz", 28881)]
    failed = dict((e.name, m) for e, m in report["failed"])
    assert "mnist/train-images-idx3-ubyte.gz: not in " in failed["train-images-idx3-ubyte.gz"]
    assert "its public source: https://raw.githubusercontent.com/lijie2020/vae/" in failed["train-images-idx3-ubyte.gz"]
    assert "refused, sha256 " in failed["t10k-labels-idx1-ubyte.gz"]
    assert not (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz.part").exists()


# --- a destination that cannot be written (issue 16, item 4) --------------------------------------------


def data_cmd(*args):
    return [sys.executable, "-m", "encouraging_loss.tools.data", *map(str, args)]


def test_fetch_into_a_read_only_folder_is_one_line(shared_data, tmp_path):
    dest = tmp_path / "ro"
    dest.mkdir()
    proc = run_confined(data_cmd("fetch", "--from", shared_data, "--dest", dest, "--only", "mnist"),
                        readonly=[dest], cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        f"el-data: error: cannot write {dest / 'mnist'}: Read-only file system; fetch "
        f"stopped there (0 files fetched, 4 not tried); rerun once {dest} can be written to: the files already "
        f"there are checked and kept"]
    assert proc.stdout.splitlines()[-1] == ("fetched 0 files, 0 bytes; already present 0 files, 0 bytes; failed 0; "
                                            f"not tried 4; in {dest}")
    assert list(dest.iterdir()) == []


def test_fetch_onto_a_full_disk_is_one_line_and_leaves_no_partial_file(shared_data, tmp_path):
    """A copy that runs out of room is removed: what stays verifies, the rest is missing, never corrupt."""
    dest = tmp_path / "disk"
    fetch_cmd = data_cmd("fetch", "--from", shared_data, "--dest", dest, "--only", "iwslt14-de-en")
    verify_cmd = data_cmd("verify", "--dir", dest, "--only", "iwslt14-de-en")
    script = f"{shlex.join(fetch_cmd)}; echo FETCH_RC=$?; {shlex.join(verify_cmd)}"
    proc = run_confined(["bash", "-c", script], full={dest: 700_000}, cwd=ROOT, timeout=120)
    out = proc.stdout.splitlines()
    assert "FETCH_RC=1" in out, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"el-data: error: cannot write {dest / 'iwslt14-de-en' / 'test.de.gz'}: No space "
        f"left on device; fetch stopped there (2 files fetched, 7 not tried); rerun once {dest} can be written to: "
        f"the files already there are checked and kept"]
    assert out[-1] == f"2 ok, 7 missing, 0 corrupt in {dest}"
    assert proc.leftovers[str(dest.resolve())] == {"iwslt14-de-en/valid.de.gz": 298904,
                                                   "iwslt14-de-en/valid.en.gz": 272243}


def test_download_onto_a_full_disk_keeps_only_a_resumable_part(shared_data, server, tmp_path):
    entry = BY_PATH["mnist/t10k-images-idx3-ubyte.gz"]
    url = served(entry, server, [(shared_data / entry.path).read_bytes()]).parts[0].urls[0]
    dest = tmp_path / "disk"
    code = ("import dataclasses, sys\nfrom encouraging_loss.tools import data as D\n"
            "e = next(f for f in D.FILES if f.path == sys.argv[1])\n"
            "e = dataclasses.replace(e, parts=(dataclasses.replace(e.parts[0], urls=(sys.argv[2],)),))\n"
            "r = D.fetch(sys.argv[3], files=[e], log=lambda m: None)\n"
            "print(r['stopped'])\nsys.exit(1 if r['stopped'] else 0)\n")
    proc = run_confined([sys.executable, "-c", code, entry.path, url, dest], full={dest: 600_000}, cwd=ROOT,
                        timeout=120)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"cannot write {dest / entry.path}: No space left on device; fetch stopped there "
                                  f"(0 files fetched, 1 not tried; the partial download {entry.name}.part is kept")
    (name, size), = proc.leftovers[str(dest.resolve())].items()
    assert name == entry.path + ".part" and 0 < size < entry.size


# --- downloads from a local HTTP server ----------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes) with ``Range: bytes=N-`` support; ``cut[path] = n`` sends only
    n bytes of the next response for path and drops the connection; ``stall[path] = n`` sends n bytes
    and then nothing (until the test ends); ``drip[path] = (pieces, seconds)`` sends the body in that
    many pieces with a pause after each (a slow link)."""

    files, requests, cut, stall, drip = {}, [], {}, {}, {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        body, wanted = self.files.get(self.path), self.headers.get("Range")
        self.requests.append((self.path, wanted))
        if body is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if wanted else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        n = self.cut.pop(self.path, None)
        data = body[start:] if n is None else body[start:start + n]
        if self.path in self.stall:
            self.wfile.write(data[:self.stall[self.path]])
            self.wfile.flush()
            self.release.wait(30)
        elif self.path in self.drip:
            pieces, pause = self.drip[self.path]
            step = -(-len(data) // pieces)
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                time.sleep(pause)
        else:
            self.wfile.write(data)


@pytest.fixture
def server():
    handler = type("H", (Handler,), {"files": {}, "requests": [], "cut": {}, "stall": {}, "drip": {},
                                     "release": threading.Event()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    handler.release.set()
    httpd.shutdown()
    httpd.server_close()


def served(entry, server, contents, dead_first=False):
    """``entry`` with each part's URL on the local server, serving ``contents[i]`` for part i."""
    parts = []
    for p, body in zip(entry.parts, contents):
        path = f"/{entry.dataset}/{p.name}"
        server.files[path] = body
        urls = ((server.base + "/gone" + path,) if dead_first else ()) + (server.base + path,)
        parts.append(dataclasses.replace(p, urls=urls))
    return dataclasses.replace(entry, parts=tuple(parts))


def xml(lines, docid=1):
    segs = "".join(f'<seg id="{i}"> {html.escape(line, quote=False)}  </seg>\n' for i, line in enumerate(lines, 1))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<srcset setid="x" srclang="any">\n'
            f'<doc docid="{docid}" genre="lectures">\n<url>http://www.ted.com/talks/x</url>\n{segs}</doc>\n'
            f'</srcset>\n</mteval>\n').encode("utf-8")


def tgz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_download_resumes_with_range_and_verifies(shared_data, server, tmp_path):
    entry = BY_PATH["mnist/t10k-images-idx3-ubyte.gz"]
    body = (shared_data / "mnist" / entry.name).read_bytes()
    local = served(entry, server, [body], dead_first=True)
    path = f"/mnist/{entry.name}"
    server.cut[path] = 700_000
    log = []
    first = D.fetch(tmp_path, files=[local], log=log.append)
    assert [m for _, m in first["failed"]] and "could not download it from any source" in first["failed"][0][1]
    assert "/gone/mnist/" in first["failed"][0][1] and "(HTTP 404 Not Found)" in first["failed"][0][1]
    part = tmp_path / "mnist" / (entry.name + ".part")
    assert part.stat().st_size == 700_000 and not (tmp_path / "mnist" / entry.name).exists()

    second = D.fetch(tmp_path, files=[local], log=log.append)
    assert not second["failed"] and [(e.path, n) for e, n in second["fetched"]] == [(entry.path, entry.size)]
    assert server.requests[-1] == (path, "bytes=700000-")
    assert "  mnist/t10k-images-idx3-ubyte.gz: resuming at 0.7 MB of 1.6 MB" in log
    final = tmp_path / "mnist" / entry.name
    assert hashlib.sha256(final.read_bytes()).hexdigest() == entry.sha256 and not part.exists()
    assert D.check_file(entry, final) == ""


def test_corrupt_download_is_refused_named_and_removed(shared_data, server, tmp_path):
    entry = BY_PATH["mnist/t10k-labels-idx1-ubyte.gz"]
    body = bytearray((shared_data / "mnist" / entry.name).read_bytes())
    body[100] ^= 0xFF
    report = D.fetch(tmp_path, files=[served(entry, server, [bytes(body)])], log=lambda m: None)
    (bad_entry, message), = report["failed"]
    actual = hashlib.sha256(bytes(body)).hexdigest()
    assert message == (f"mnist/t10k-labels-idx1-ubyte.gz: refused, sha256 {actual}, expected {entry.sha256} "
                       f"(4542 bytes, expected 4542); from {server.base}/mnist/t10k-labels-idx1-ubyte.gz; "
                       f"the bad copy was removed")
    assert list((tmp_path / "mnist").iterdir()) == []

    text = BY_PATH["iwslt14-de-en/valid.en.gz"]
    upstream = gunzip(shared_data / text.dataset / text.name).replace(b"thank you", b"thank yuo", 1)
    report = D.fetch(tmp_path, files=[served(text, server, [upstream])], log=lambda m: None)
    (_, message), = report["failed"]
    assert message.startswith("iwslt14-de-en/valid.en.gz: refused: content derived (text) from http://127.0.0.1:")
    digest = hashlib.sha256(upstream).hexdigest()
    assert f"has sha256 {digest}, expected {text.raw_sha256}; downloads removed" in message
    assert not (tmp_path / text.dataset / text.name).exists()
    assert not (tmp_path / ".downloads" / text.dataset / "valid.en").exists()


def test_derived_files_from_upstream_forms(shared_data, server, tmp_path):
    """Each kind of derivation, on the upstream form of real files, gives the stored content."""
    def lines(path):
        return gunzip(shared_data / path).decode("utf-8").splitlines()

    files = []
    valid = BY_PATH["iwslt14-de-en/valid.de.gz"]  # plain upstream text, gzipped here
    files.append(served(valid, server, [gunzip(shared_data / valid.path)]))
    sample = BY_PATH["iwslt14-de-en/train-sample.de.gz"]  # BPE'd upstream: markers removed
    bpe = "".join(" ".join(w[:2] + "@@ " + w[2:] if len(w) > 4 else w for w in line.split(" ")) + "\n"
                  for line in lines(sample.path))
    assert "@@ " in bpe
    files.append(served(sample, server, [bpe.encode("utf-8")]))
    raw = BY_PATH["iwslt14-de-en/test.raw.de.gz"]  # five XML files, concatenated in order
    segs, parts, start = lines(raw.path), [], 0
    for n in (887, 1165, 1565, 1433, 1700):
        parts.append(xml(segs[start:start + n]))
        start += n
    files.append(served(raw, server, parts))
    archive = tgz({"fr-en/IWSLT17.TED.tst2017.fr-en.fr.xml": xml(lines("iwslt17-fr-en/test.fr.gz")),
                   "fr-en/IWSLT17.TED.tst2016.fr-en.fr.xml": xml(lines("iwslt17-fr-en/tst2016.fr.gz"))})
    for name in ("test.fr.gz", "tst2016.fr.gz"):  # members of one archive, downloaded once
        files.append(served(BY_PATH[f"iwslt17-fr-en/{name}"], server, [archive]))
    trim = BY_PATH["multi30k-de-en/valid.wmt16.de.gz"]  # upstream has one more, empty, line
    files.append(served(trim, server, [gunzip(shared_data / trim.path) + b"\n"]))

    log = []
    report = D.fetch(tmp_path, files=files, log=log.append)
    assert not report["failed"], report["failed"]
    assert [e.path for e, _ in report["fetched"]] == [f.path for f in files]
    assert [r for r in server.requests if r[0].endswith("fr-en.tgz")] == [("/iwslt17-fr-en/fr-en.tgz", None)]
    for f in files:
        got = tmp_path / f.dataset / f.name
        assert gunzip(got) == gunzip(shared_data / f.path), f.path
        assert D.check_file(f, got) == ""
    assert "downloading fr-en.tgz for iwslt17-fr-en/test.fr.gz" in log
    assert not (tmp_path / ".downloads").exists()  # removed once everything verified


# --- a network that does not answer, a slow one (issue 16, 5b) -------------------------------------------


@pytest.fixture
def silent_port():
    """A port whose server takes connections (the kernel completes them) and never says anything."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def blackhole_port():
    """A port where connection attempts get no answer at all, as on a network that drops packets: a
    listening socket whose accept queue is full (the kernel then drops new SYNs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port, fillers = sock.getsockname()[1], []
    for _ in range(8):
        filler = socket.socket()
        filler.settimeout(0.3)
        fillers.append(filler)
        try:
            filler.connect(("127.0.0.1", port))
        except socket.timeout:
            break
    else:
        pytest.skip("cannot fill a listen queue here: no unanswered port to test with")
    yield port
    for filler in fillers:
        filler.close()
    sock.close()


@pytest.fixture
def refused_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def at(entry, *urls):
    return dataclasses.replace(entry, parts=tuple(dataclasses.replace(p, urls=tuple(urls)) for p in entry.parts))


def test_a_server_that_never_answers_fails_within_the_stall_timeout(shared_data, server, silent_port, tmp_path):
    entry = BY_PATH[LABELS]
    url = f"http://127.0.0.1:{silent_port}/{entry.name}"
    start = time.monotonic()
    report = D.fetch(tmp_path, files=[at(entry, url)], log=lambda m: None, connect_timeout=20, stall_timeout=1,
                     progress=lambda m: None)
    assert time.monotonic() - start < 10  # the stall timeout (1 s), not the connect timeout (20 s) nor 60 s
    (_, message), = report["failed"]
    assert message == (f"{LABELS}: could not download it from any source: {url} (connected, but no answer "
                       f"within 1 s)")
    assert not report["stopped"] and not list((tmp_path / "mnist").iterdir())

    path = f"/mnist/{entry.name}"  # a body that stops coming halfway
    local = served(entry, server, [(shared_data / LABELS).read_bytes()])
    server.stall[path] = 1000
    start = time.monotonic()
    report = D.fetch(tmp_path, files=[local], log=lambda m: None, connect_timeout=20, stall_timeout=1,
                     progress=lambda m: None)
    assert time.monotonic() - start < 10
    (_, message), = report["failed"]
    assert message.endswith(f"{server.base}{path} (stalled: no data for 1 s after 1,000 bytes) (a partial download "
                            f"is kept and resumed next time)")
    assert (tmp_path / (LABELS + ".part")).stat().st_size == 1000
    del server.stall[path]
    report = D.fetch(tmp_path, files=[local], log=lambda m: None, stall_timeout=1)
    assert [e.path for e, _ in report["fetched"]] == [LABELS] and server.requests[-1] == (path, "bytes=1000-")


@pytest.mark.parametrize("kind", ["blackhole", "refused"])
def test_an_unreachable_network_stops_fetch_after_a_few_attempts(kind, request, tmp_path):
    port = request.getfixturevalue(f"{kind}_port")
    copies = [f for f in D.FILES if f.how == "copy"][:8]  # 16 URLs
    dead = [at(f, f"http://127.0.0.1:{port}/a/{f.name}", f"http://127.0.0.1:{port}/b/{f.name}") for f in copies]
    log = []
    report = D.fetch(tmp_path, files=dead, log=log.append, connect_timeout=0.5, progress=lambda m: None)
    reason = "no connection within 0.5 s" if kind == "blackhole" else "Connection refused"
    attempts = [line for line in log if " failed: " in line]
    assert len(attempts) == 2 and all(line.endswith(f" failed: {reason}") for line in attempts)
    assert report["stopped"] == (
        f"the network seems unreachable: 2 connection attempts failed, 2 in a row to each server the files need "
        f"(127.0.0.1:{port}: {reason}), so fetch stopped; to copy the data from a local copy instead: "
        f"el-data fetch --from DIR (e.g. a checkout's ../shared/data)")
    assert report["failed"] == [] and report["fetched"] == [] and report["not_tried"] == dead
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "verified.json"]


def test_a_dead_server_is_skipped_and_its_files_come_from_their_other_sources(shared_data, server, refused_port,
                                                                              tmp_path):
    """A dead first source next to a working one is not an unreachable network: after 2 failed
    connections the dead server is skipped (no more waiting on it), the files come from the other."""
    copies = [f for f in D.FILES if f.how == "copy" and f.size < 40_000][:4]
    local = [served(f, server, [(shared_data / f.path).read_bytes()]) for f in copies]
    mixed = [at(f, f"http://127.0.0.1:{refused_port}/{f.name}", f.parts[0].urls[0]) for f in local]
    log = []
    report = D.fetch(tmp_path, files=mixed, log=log.append, connect_timeout=0.5)
    assert not report["stopped"] and not report["failed"] and len(report["fetched"]) == 4
    assert sum(" failed: Connection refused" in line for line in log) == 2


def test_one_blocked_server_does_not_stop_fetch(shared_data, server, refused_port, tmp_path):
    """Files only on a blocked server fail (fast, once it is known dead); files on a reachable
    server are fetched: the network is not taken as down while one server answers."""
    copies = [f for f in D.FILES if f.how == "copy" and f.size < 40_000][:4]
    blocked = [at(f, f"http://127.0.0.1:{refused_port}/{f.name}") for f in copies[:3]]
    reachable = [served(copies[3], server, [(shared_data / copies[3].path).read_bytes()])]
    log = []
    report = D.fetch(tmp_path, files=blocked + reachable, log=log.append, connect_timeout=0.5)
    assert not report["stopped"] and [e for e, _ in report["fetched"]] == reachable
    assert [e for e, _ in report["failed"]] == blocked
    assert sum(" failed: Connection refused" in line for line in log) == 2
    assert f"skipped: 127.0.0.1:{refused_port} unreachable" in report["failed"][2][1]


def test_fetch_command_stops_at_once_on_an_unreachable_network(blackhole_port, tmp_path):
    """The real table (87 URLs on 3 servers) through a proxy that never answers: two attempts of 0.5 s
    per server, then one line."""
    proxy = f"http://127.0.0.1:{blackhole_port}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy",
                                                                    "all_proxy")}
    env.update(http_proxy=proxy, https_proxy=proxy, EL_FETCH_CONNECT_TIMEOUT="0.5")
    dest = tmp_path / "cache"
    out = subprocess.run(data_cmd("fetch", "--dest", dest), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    (error,) = out.stderr.splitlines()
    assert error.startswith("el-data: error: the network seems unreachable: 6 connection "
                            "attempts failed, 2 in a row to each server the files need (raw.githubusercontent.com: "
                            "no connection within 0.5 s; ")
    assert error.endswith("to copy the data from a local copy instead: el-data fetch "
                          "--from DIR (e.g. a checkout's ../shared/data)")
    lines = out.stdout.splitlines()
    assert sum(" failed: " in line for line in lines) == 6
    assert lines[-1] == f"fetched 0 files, 0 bytes; already present 0 files, 0 bytes; failed 0; not tried 43; in {dest}"


def test_a_slow_download_reports_progress_on_stderr(shared_data, server, tmp_path, capsys):
    entry = BY_PATH[LABELS]
    local = served(entry, server, [(shared_data / LABELS).read_bytes()])
    server.drip[f"/mnist/{entry.name}"] = (12, 0.15)  # 4542 bytes over about 1.8 s
    log = []
    report = D.fetch(tmp_path, files=[local], log=log.append, progress_every=0.25)
    assert [e.path for e, _ in report["fetched"]] == [LABELS]
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if "waiting for 127.0.0.1" not in x]
    progress = re.compile(rf"  {re.escape(LABELS)}: ([\d,]+) bytes of 4,542 bytes \(\d+%\), "
                          r"(?:[\d,]+ bytes/s|no data for \d+ s)")
    assert len(lines) >= 4 and all(progress.fullmatch(x) for x in lines), captured.err
    done = [int(progress.fullmatch(x).group(1).replace(",", "")) for x in lines]
    assert done == sorted(done) and 0 < done[0] < 4542
    assert sum(x.endswith(" bytes/s") for x in lines) >= 3
    assert not [x for x in log if "bytes of" in x] and "bytes of" not in captured.out


# --- a fresh clone -----------------------------------------------------------------------------------

PROBE = '''
import json, os
import encouraging_loss.tools.data
uses, results = {}, {}

def pytest_collection_modifyitems(session, config, items):
    for item in items:
        uses[item.nodeid] = "shared_data" in item.fixturenames

def pytest_runtest_logreport(report):
    rec = results.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
    if report.failed:
        rec.update(outcome="error" if report.when != "call" else "failed", reason=str(report.longrepr)[-800:])
    elif report.skipped and rec["outcome"] == "passed":
        longrepr = report.longrepr
        rec.update(outcome="skipped", reason=longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))

def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["EL_PROBE_OUT"], "w") as f:
        json.dump({"uses": uses, "results": results, "module": encouraging_loss.tools.data.__file__}, f)
'''


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """This working tree (tracked and untracked, not ignored, files) copied where no ../shared is beside it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    base = tmp_path_factory.mktemp("fresh")
    repo = base / "repo"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (base / "probe").mkdir()
    (base / "probe" / "el_probe.py").write_text(PROBE)
    (base / "cache").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("EL_SHARED_DATA", "EL_REQUIRE_DATA")}
    env.update(EL_DATA=str(base / "cache"), EL_PROBE_OUT=str(base / "probe.json"),
               EL_VERIFY_CACHE=str(base / "verified.json"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(base / "probe"), env.get("PYTHONPATH")])))
    assert not (base / "shared").exists()
    return repo, env, base


def data_test_files(repo):
    """The test modules that use the shared data (directly or through conftest.py's fixtures built from it)."""
    uses = ("shared_data", "iwslt14_slice", "mnist_folder_of")
    return sorted(p.relative_to(repo).as_posix() for p in (repo / "tests").rglob("test_*.py")
                  if any(name in p.read_text(encoding="utf-8") for name in uses)
                  and p.relative_to(repo).as_posix() != "tests/core/tools/test_data.py")


def test_fresh_clone_skips_data_tests_naming_the_fetch_command(clone):
    repo, env, base = clone
    files = data_test_files(repo)
    assert "tests/fairseq_el/test_prep_multi30k.py" in files and len(files) >= 10
    out = subprocess.run([sys.executable, "-m", "pytest", "--setup-only", "-q", "-rs", "-p", "el_probe",
                          "-p", "no:cacheprovider", *files], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    probe = json.loads((base / "probe.json").read_text())
    assert Path(probe["module"]).resolve().is_relative_to(repo.resolve())  # the clone tests itself
    results, uses = probe["results"], probe["uses"]
    assert set(results) == set(uses) and sum(uses.values()) >= 50
    assert not [n for n, r in results.items() if r["outcome"] in ("error", "failed")]
    for nodeid, needs in uses.items():
        if needs:
            assert results[nodeid]["outcome"] == "skipped", nodeid
            reason = results[nodeid]["reason"]
            assert reason.startswith("Skipped: test data not found (no complete copy in ") and "\n" not in reason
            assert reason.endswith("; run: el-data fetch"), reason
            assert str(base / "shared" / "data") in reason and str(base / "cache") in reason
    assert "error" not in out.stdout.splitlines()[-1]


def test_fresh_clone_collects_everything(clone):
    repo, env, _ = clone
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and " collected" in out.stdout.splitlines()[-1], out.stdout[-3000:]


def test_fresh_clone_with_el_require_data_fails_at_once(clone):
    repo, env, base = clone
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/fairseq_el/test_prep_multi30k.py"], cwd=repo, env=dict(env, EL_REQUIRE_DATA="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    text = out.stdout + out.stderr
    places = f"{base / 'shared' / 'data'}, {base / 'cache'}"
    assert (f"EL_REQUIRE_DATA is set but test data not found (no complete copy in {places}); "
            "run: el-data fetch") in text
    assert "passed" not in text and "skipped" not in text


def test_fresh_clone_uses_a_fetched_cache(clone, shared_data):
    """Filled by the fetch command, the cache is found by the clone's tests (nothing skipped)."""
    repo, env, base = clone
    cache = base / "filled"
    assert run_cli("fetch", "--from", shared_data, "--dest", cache, cwd=repo, env=env).returncode == 0
    env = dict(env, EL_DATA=str(cache), EL_REQUIRE_DATA="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "--setup-only", "-q", "-p", "el_probe", "-p",
                          "no:cacheprovider", "tests/fairseq_el/test_prep_multi30k.py"], cwd=repo, env=env,
                         capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    results = json.loads((base / "probe.json").read_text())["results"]
    assert results and all(r["outcome"] == "passed" for r in results.values())
