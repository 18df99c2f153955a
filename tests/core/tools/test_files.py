"""encouraging_loss.tools.files: atomic writes, one-line file problems, safe checkpoint reads."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from encouraging_loss.tools.files import (
    FileProblem,
    atomic_path,
    atomic_write,
    check_writable_dir,
    load_checkpoint_safely,
    os_error_line,
    read_json,
    write_json,
)

from confined import run_confined


class _RunsCode:
    """Unpickling this creates the file named by ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_atomic_write_replaces_only_at_the_end(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half a new table")
            assert target.read_text() == "old\n"  # not visible while being written
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]  # no temporary file left
    with atomic_write(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_atomic_path_for_writers_taking_a_name(tmp_path):
    target = tmp_path / "w.pt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        torch.save({"a": torch.arange(3)}, tmp)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(3))
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_atomic_write_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(tmp_path / "x", mode="a"):
            pass


def test_write_json_refuses_non_finite_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "r.json", {"top1": float("nan")})
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "r.json", {"top1": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"top1": 1.5}


@pytest.mark.parametrize("text, message", [
    ("[]", "holds a JSON array, expected an object"),
    ("3", "holds a JSON number, expected an object"),
    ('{"schema": "el-prep/1", "bin":', "not valid JSON"),
    ("", "empty"),
    ('{"a": 1}\x00\x00', "NUL bytes"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('[[[[[[[[[[{"a": 1}]]]]]]]]]]', "nested more than 8 levels"),
    ('{"a": {"b": [1, NaN]}}', "NaN is not a JSON number"),
    ('{"a": {"b": [1, 1e999]}}', "a.b[1] is not a finite number"),
])
def test_read_json_problems_are_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "prep.json"
    path.write_text(text)
    with pytest.raises(FileProblem) as err:
        read_json(path, "prep.json", max_depth=8)
    line = str(err.value)
    assert message in line and str(path) in line and "\n" not in line


def test_read_json_good_and_missing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": [1, 2.5, 1.7e308]}')
    assert read_json(path) == {"a": [1, 2.5, 1.7e308]}
    assert read_json(path, expect=(dict, list)) == {"a": [1, 2.5, 1.7e308]}
    with pytest.raises(FileProblem, match="not found"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(FileProblem, match="not UTF-8"):
        read_json(tmp_path / "bin.json")


def test_safe_checkpoint_read_refuses_code_even_under_the_override(tmp_path):
    """A pickle that would run code is refused before anything in it runs, with torch's
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set (it switches off only an implicit weights_only)."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": _RunsCode(marker)}, evil)
    code = ("import sys; from encouraging_loss.tools.files import load_checkpoint_safely, FileProblem\n"
            "try:\n    load_checkpoint_safely(sys.argv[1])\nexcept FileProblem as e:\n    print(e)\n")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code, str(evil)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout and "io.open" in out.stdout
    assert not marker.exists()
    # the same file under a plain torch.load with the override does run code: the test can fail
    plain = "import sys, torch; torch.load(sys.argv[1])"
    subprocess.run([sys.executable, "-c", plain, str(evil)], env=env, capture_output=True, text=True)
    assert marker.exists()


@pytest.fixture
def empty_allow_list():
    """torch's allow-list emptied for the test (other tests' imports, e.g. fairseq_el, add to it), then restored."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


@pytest.mark.usefixtures("empty_allow_list")
def test_safe_checkpoint_read_allows_listed_types_only(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(model="resnet18")}, path)
    with pytest.raises(FileProblem, match="argparse.Namespace"):
        load_checkpoint_safely(path, "--resume")
    state = load_checkpoint_safely(path, "--resume", allowed=[argparse.Namespace])
    assert state["args"].model == "resnet18" and torch.equal(state["state_dict"]["w"], torch.ones(2))
    # the temporary allow-list is gone afterwards, and a type allowed before stays allowed
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([argparse.Namespace]):
        load_checkpoint_safely(path, allowed=[argparse.Namespace])
        assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_safe_checkpoint_read_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in [("cut.pt", "damaged or truncated"), ("text.pt", "not a PyTorch checkpoint file"),
                          ("empty.pt", "empty"), ("none.pt", "not found")]:
        with pytest.raises(FileProblem) as err:
            load_checkpoint_safely(tmp_path / name, "checkpoint5.pt")
        assert message in str(err.value) and name in str(err.value), str(err.value)
    with pytest.raises(FileProblem, match="is a folder"):
        load_checkpoint_safely(tmp_path)


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileProblem, match="--out .*file: exists and is not a folder"):
        check_writable_dir(tmp_path / "file", "--out")


def test_os_error_line():
    err = OSError(28, "No space left on device", "/x/y.pt")
    assert os_error_line(err) == "cannot write /x/y.pt: No space left on device"
    assert os_error_line(err, "/z", "cannot read") == "cannot read /z: No space left on device"


def test_full_disk_and_read_only_folder_for_real(tmp_path):
    """On a real full disk the target keeps its old content and no temporary file is left; a
    read-only folder is refused by the up-front check, naming the flag."""
    disk, ro = tmp_path / "disk", tmp_path / "ro"
    code = (
        "import sys\n"
        "from encouraging_loss.tools.files import atomic_write, check_writable_dir, os_error_line, FileProblem\n"
        "disk, ro = sys.argv[1], sys.argv[2]\n"
        "with atomic_write(disk + '/t.md') as f:\n    f.write('old')\n"
        "try:\n"
        "    with atomic_write(disk + '/t.md') as f:\n        f.write('x' * 200000)\n"
        "except OSError as e:\n    print(os_error_line(e, disk + '/t.md'))\n"
        "print(open(disk + '/t.md').read())\n"
        "try:\n    check_writable_dir(ro, '--out')\nexcept FileProblem as e:\n    print(e)\n")
    proc = run_confined([sys.executable, "-c", code, disk, ro], full={disk: 64 * 1024}, readonly=[ro])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"cannot write {disk}/t.md: No space left on device"
    assert lines[1] == "old"
    assert lines[2] == f"--out {ro}: cannot write there (Read-only file system)"
    assert proc.leftovers[str(disk)] == {"t.md": 3}


def test_a_truncated_legacy_checkpoint_is_damaged_not_hostile(tmp_path):
    """torch's old (non-zip) format cut at any byte: always 'damaged or truncated', never 'refused'
    (a cut can end inside a pickled name such as ``argparse.Namesp``, which the unpickler reports
    as an unsupported global)."""
    whole = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.randn(8, 8)}, "args": argparse.Namespace(arch="t")}, whole,
               _use_new_zipfile_serialization=False)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    messages = set()
    for n in range(1, min(len(data), 700)):
        cut.write_bytes(data[:n])
        with pytest.raises(FileProblem) as err:
            load_checkpoint_safely(cut, allowed=[argparse.Namespace])
        messages.add(str(err.value).split(": ", 1)[1].split(" (", 1)[0])
    assert messages == {"not a readable PyTorch checkpoint"}
    assert load_checkpoint_safely(whole, allowed=[argparse.Namespace])["args"].arch == "t"


def test_check_writable_dir_without_creating(tmp_path):
    out = tmp_path / "a" / "b"
    assert check_writable_dir(out, "--out", create=False) == out and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileProblem, match=r"--out .*file/report: cannot be created, .*file is not a folder"):
        check_writable_dir(tmp_path / "file" / "report", "--out", create=False)
    with pytest.raises(FileProblem, match="exists and is not a folder"):
        check_writable_dir(tmp_path / "file", "--out", create=False)


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.md") as f:
            f.write("x")
        assert (tmp_path / "new.md").stat().st_mode & 0o777 == 0o644
        (tmp_path / "script.sh").write_text("old")
        os.chmod(tmp_path / "script.sh", 0o750)
        with atomic_write(tmp_path / "script.sh") as f:
            f.write("new")
        assert (tmp_path / "script.sh").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_check_writable_dir_names_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileProblem) as err:
        check_writable_dir(tmp_path / "file" / "out" / "deeper", "--output")
    assert str(err.value) == (f"--output {tmp_path / 'file' / 'out' / 'deeper'}: cannot be created, "
                              f"{tmp_path / 'file'} is not a folder")
    assert (tmp_path / "file").read_text() == "x"
