"""Run a command where some folders are read-only or on a tiny disk, as a user
would meet them, without root privileges leaking into the test: the command
runs in its own user + mount namespace (``unshare``), where a folder is
bind-mounted read-only or replaced by a small ``tmpfs``. Nothing changes
outside the command's own namespace.

Root ignores folder permissions (``chmod 555`` stops nobody here), so a real
read-only mount is the only honest read-only folder; a small ``tmpfs`` gives
the real "No space left on device" of a full disk.

    proc = run_confined([sys.executable, "-m", "encouraging_loss.tools.results", ...],
                        readonly=[out_dir], full={disk_dir: 64 * 1024})
"""
import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

import pytest

PathLike = Union[str, os.PathLike]


@functools.lru_cache(maxsize=None)
def confinement_problem() -> Optional[str]:
    """Why :func:`run_confined` cannot work here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux mount namespaces"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         "d=$(mktemp -d) && mount -t tmpfs -o size=16k tmpfs \"$d\" && umount \"$d\" && rmdir \"$d\""],
        capture_output=True, text=True)
    if probe.returncode != 0:
        return f"user + mount namespaces are not allowed here ({probe.stderr.strip()[:200]})"
    return None


def needs_confinement():
    """Skip the calling test, saying why, where folders cannot be confined."""
    problem = confinement_problem()
    if problem:
        pytest.skip(f"read-only / full-disk test: {problem}")


def run_confined(cmd: Sequence[str], *, readonly: Iterable[PathLike] = (), full: Dict[PathLike, int] = None,
                 prefill: Dict[PathLike, PathLike] = None, cwd: Optional[PathLike] = None,
                 env: Optional[dict] = None, timeout: float = 600, input: Optional[str] = None
                 ) -> subprocess.CompletedProcess:
    """Run ``cmd`` with each folder in ``readonly`` mounted read-only and each folder in ``full``
    replaced by an empty tmpfs of that many bytes (filled first with the contents of
    ``prefill[folder]`` when given). Returns the completed process (text output captured); its
    ``leftovers`` maps each ``full`` folder to ``{relative path: size}`` of the files the command
    left there (the tmpfs itself is gone when the command ends)."""
    needs_confinement()
    steps = []
    for folder, size in (full or {}).items():
        folder = os.fspath(Path(folder).resolve())
        os.makedirs(folder, exist_ok=True)
        steps.append(f"mount -t tmpfs -o size={int(size)} tmpfs {shlex.quote(folder)}")
        source = (prefill or {}).get(folder) or (prefill or {}).get(Path(folder))
        if source is not None:
            steps.append(f"cp -a {shlex.quote(os.fspath(source))}/. {shlex.quote(folder)}/")
    for folder in readonly:
        folder = os.fspath(Path(folder).resolve())
        os.makedirs(folder, exist_ok=True)
        quoted = shlex.quote(folder)
        steps.append(f"mount --bind {quoted} {quoted} && mount -o remount,bind,ro {quoted}")
    # a tmpfs vanishes with the namespace: list what the command left in it into a file outside
    listing = tempfile.NamedTemporaryFile(prefix="confined-", suffix=".txt", delete=False)
    listing.close()
    lists = " ; ".join(
        f"find {shlex.quote(os.fspath(Path(f).resolve()))} -type f -printf "
        f"'{os.fspath(Path(f).resolve())}\\t%P\\t%s\\n' >> {shlex.quote(listing.name)}"
        for f in (full or {}))
    script = " && ".join(steps + ['{ "$@"; rc=$?; }']) + (f" ; {lists}" if lists else "") + " ; exit $rc"
    try:
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "confined", *map(str, cmd)],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=input)
        proc.leftovers = {os.fspath(Path(f).resolve()): {} for f in (full or {})}
        for line in Path(listing.name).read_text().splitlines():
            folder, rel, size = line.split("\t")
            proc.leftovers[folder][rel] = int(size)
    finally:
        os.unlink(listing.name)
    return proc


def files_under(folder: PathLike) -> Dict[str, int]:
    """Relative path -> size of every file under ``folder`` (to show that nothing was left behind)."""
    root = Path(folder)
    return {os.fspath(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


NO_SPACE = "No space left on device"
READ_ONLY = "Read-only file system"


def one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The one error line (starting with ``prefix``) of a failed command, which printed no traceback (its
    other stderr lines are progress)."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def leftovers(proc: subprocess.CompletedProcess, folder: PathLike) -> Dict[str, int]:
    """What the command left in ``folder``, one of its ``full`` folders: relative path -> size."""
    return proc.leftovers[os.fspath(Path(folder).resolve())]
