"""Shared machinery of the translation data preparation commands.

``prep_iwslt14``, ``prep_iwslt17`` and ``prep_multi30k`` each turn one corpus
into the same output layout (the evaluation and recipe code relies on it)::

    OUT/data/{train,valid,test}.{src,tgt}   text before BPE (tokenized or raw)
    OUT/bpe/                                code (subword-nmt) or spm.model/spm.vocab
    OUT/text/{train,valid,test}.{src,tgt}   BPE'd text fed to fairseq-preprocess
    OUT/text/{valid,test}.ref.{tgt}         raw target text, the sacreBLEU reference
    OUT/bin/                                stock ``fairseq-preprocess --joined-dictionary`` output
    OUT/prep.json                           metadata (schema ``el-prep/1``), written last
    OUT/orig/                               downloads (kept by --force)

This module holds what they share: reading plain or gzipped text, refusing
missing files and misaligned pairs before any work, reading IWSLT archives
(tarball or directory), downloads, BPE (subword-nmt and sentencepiece), the
``fairseq-preprocess`` call, and stage skipping. Importing it imports neither
torch nor fairseq: fairseq-preprocess runs as a subprocess, and fairseq's
dataset reader is imported only to count the binarized sentences after it.

Lines: every text file is split at ``\n`` only (a ``\r\n`` end counts as
``\n``), as fairseq-preprocess must see them; inside a sentence, the
characters that some readers take for a line end (:data:`LINE_BREAKS`:
``\r``, ``\v``, ``\f``, ``\x1c``-``\x1e``, ``\x85``, ``\u2028``,
``\u2029``; fairseq-preprocess splits lines at ``\r``) become a space, on
both sides of every split and in the references, so source and target keep
one sentence per line. After binarizing, the number of sentences in each
``bin/`` split of each language is checked against the text.

Writes: a stage is built in ``OUT/NAME.partial`` and renamed to ``OUT/NAME``
only when all of it is written; single files (``prep.json``, the argument
record, the BPE model) are written through a temporary name. A failed write
(a full disk) stops the command with one line, ``cannot write PATH: REASON``,
and leaves nothing a rerun would take as finished.
"""
import argparse
import contextlib
import gzip
import html
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from encouraging_loss.tools import cli
from encouraging_loss.tools.files import FileProblem, atomic_write, os_error_line, read_json, write_json

SCHEMA = "el-prep/1"
SPLITS = ("train", "valid", "test")
# entries of OUT that a run owns; --force removes these (never orig/, never anything else)
OWNED = ("data", "bpe", "text", "bin", "prep.json", ".prep-args.json")
ARGS_FILE = ".prep-args.json"
# arguments that do not change the output, so a rerun may differ in them
NOT_COMPARED = ("out", "workers", "force")


class PrepError(Exception):
    """Bad input or a failed step; the command prints it as one line and exits 1."""


#: characters that ``str.splitlines`` (and, for ``\r``, fairseq-preprocess's reader) take for a line end;
#: inside a sentence each becomes a space (:func:`clean_line_breaks`)
LINE_BREAKS = "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK_RE = re.compile(f"[{re.escape(LINE_BREAKS)}]")


def clean_line_breaks(line: str) -> str:
    """``line`` with each character of :data:`LINE_BREAKS` replaced by a space (nothing else changes)."""
    return _LINE_BREAK_RE.sub(" ", line)


@contextlib.contextmanager
def writing(path):
    """Turn an ``OSError`` raised while writing ``path`` into a one-line PrepError,
    ``cannot write PATH: REASON`` (a write error carries no file name of its own)."""
    try:
        yield
    except PrepError:
        raise
    except OSError as err:
        raise PrepError(os_error_line(err, path)) from None


def read_prep_json(data, flag: str = "--data") -> dict:
    """``DATA/prep.json`` as a dict, for the commands that take a prepared directory; every problem
    is a :class:`~encouraging_loss.tools.files.FileProblem` with one line, e.g.
    ``--data DIR: prep.json holds a JSON array, expected an object``. Its ``bin`` must be a folder
    name (default ``bin``) inside DATA."""
    path = os.path.join(os.fspath(data), "prep.json")
    where = f"{flag} {os.fspath(data)}"
    try:
        prep = read_json(path, "prep.json")
    except FileProblem as err:
        text, prefix = str(err), f"prep.json {path}: "
        if text.startswith(prefix):
            detail = text[len(prefix):]
            detail = ("is " + detail) if detail.startswith(("not ", "empty", "nested")) else detail
            raise FileProblem(f"{where}: prep.json {detail}") from None
        raise FileProblem(f"{where}: {text}") from None
    name = prep.get("bin", "bin")
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise FileProblem(f"{where}: prep.json bin is {name!r}, expected the name of a folder in {os.fspath(data)}")
    return prep


# ---------------------------------------------------------------------------
# command line

Parser = cli.Parser  # the project's parser: defaults in --help, one-line errors


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def lines_limit(text: str) -> int:
    """argparse type: a number of lines, 0 meaning all."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of lines >= 0 (0 = all), got {text!r}")
    return value


def name_list(text: str) -> List[str]:
    """argparse type: comma-separated file stems, e.g. ``iwslt16.tst2010,iwslt16.tst2011``."""
    names = [n.strip() for n in text.split(",")]
    if not all(names) or any("/" in n for n in names):
        raise argparse.ArgumentTypeError(f"must be comma-separated file names without '/', got {text!r}")
    return names


def add_common_args(parser: Parser) -> None:
    """--out, --workers, --force and the --{train,valid,test}-lines slicing flags."""
    parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR",
                        help="output directory (required)")
    parser.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="processes for tokenization/BPE and fairseq-preprocess")
    parser.add_argument("--force", action="store_true",
                        help="rebuild OUT from scratch, also when it holds a preparation with other arguments "
                             "(only this command's outputs are removed; downloads in OUT/orig are kept)")
    for split in SPLITS:
        parser.add_argument(f"--{split}-lines", type=lines_limit, default=0, metavar="N",
                            help=f"keep only the first N {split} pairs, 0 = all (small runs and tests)")


def add_smoke_arg(parser: Parser, smoke_args: Sequence[str]) -> None:
    """--smoke: the preparation of a CPU smoke run, ``smoke_args`` (the module's ``SMOKE``) as defaults."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"a small preparation for a CPU smoke run (python -m fairseq_el.train --smoke): as if "
                             f"'{' '.join(smoke_args)}' came first (flags given explicitly win); prep.json then "
                             "names the task <task>_smoke, so that every result record and table says smoke")


def parse_args(parser: Parser, argv: Optional[Sequence[str]], smoke_args: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``; with ``--smoke``, ``smoke_args`` are put in front (explicit flags win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "smoke", False):
        args = parser.parse_args([*smoke_args, *argv])
    return args


def task_name(task: "Task", args: argparse.Namespace) -> str:
    """prep.json's task: the corpus's, with ``_smoke`` for a ``--smoke`` preparation."""
    return task.name + ("_smoke" if getattr(args, "smoke", False) else "")


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a command body; a PrepError or OSError becomes one line on stderr and exit status 1."""
    try:
        return body()
    except (PrepError, FileProblem) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{prog}: error: {os_error_line(err, action=_os_action(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def _os_action(err: OSError) -> str:
    import errno

    return "cannot write" if err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG) else "cannot use"


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[prep] {message}", file=sys.stderr, flush=True)


class Progress:
    """Prints ``label: done/total`` on stderr at most every few seconds."""

    def __init__(self, label: str, total: int, every: float = 5.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done >= self.total or now - self.last >= self.every:
            self.last = now
            log(f"{self.label}: {done:,}/{self.total:,} lines ({now - self.start:.0f}s)")


# ---------------------------------------------------------------------------
# text files


def open_text(path: Path, mode: str = "r"):
    """Open plain or ``.gz`` UTF-8 text; lines end at '\\n' only (as for wc -l and perl)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def split_text(text: str) -> List[str]:
    """Split text into lines at '\\n' (a trailing '\\r' is dropped, a final newline ends no line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: Path, limit: int = 0) -> List[str]:
    """The lines of a plain or gzipped UTF-8 file, without line ends; the first ``limit`` if > 0."""
    lines = []
    try:
        with open_text(path) as f:
            for line in f:
                line = line.rstrip("\n")
                lines.append(line[:-1] if line.endswith("\r") else line)
                if len(lines) == limit:
                    break
    except UnicodeDecodeError as err:
        raise PrepError(f"{path}: not UTF-8 text after line {len(lines)} ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise PrepError(f"cannot read {path}: {err}") from None
    return lines


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write lines (one per line, '\\n' ends) to a plain UTF-8 file; returns their number.
    A line holding a '\\n' would become two: refused. A failed write is a one-line PrepError."""
    n = 0
    with writing(path), open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            if "\n" in line:
                raise PrepError(f"cannot write {path}: line {n + 1} holds a line break")
            f.write(line + "\n")
            n += 1
    return n


def count_lines(path: Path) -> int:
    """Number of lines of a plain or gzipped file, as ``wc -l`` (plus an unterminated last line)."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    n, last = 0, b"\n"
    try:
        with opener(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                n += block.count(b"\n")
                last = block[-1:]
    except (OSError, EOFError) as err:
        raise PrepError(f"cannot read {path}: {err}") from None
    return n + (last != b"\n")


def find_text(directory: Path, stem: str, lang: str) -> Path:
    """``DIR/STEM.LANG`` or ``DIR/STEM.LANG.gz``, whichever exists; PrepError when neither does."""
    for name in (f"{stem}.{lang}", f"{stem}.{lang}.gz"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise PrepError(f"missing input file: {Path(directory) / f'{stem}.{lang}'} (or .gz)")


def check_aligned(pairs: Sequence[Tuple[Path, Path]]) -> Dict[Path, int]:
    """Refuse missing files, then pairs whose line counts differ; returns each file's count."""
    for pair in pairs:
        for path in pair:
            if not Path(path).is_file():
                raise PrepError(f"missing input file: {path}")
    counts = {}
    for a, b in pairs:
        na, nb = counts.setdefault(a, count_lines(a)), counts.setdefault(b, count_lines(b))
        if na != nb:
            raise PrepError(f"misaligned inputs: {a} has {na} lines but {b} has {nb}")
    return counts


def check_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence, what: str = "lines") -> None:
    """Refuse two in-memory sides of a corpus whose lengths differ."""
    if len(a) != len(b):
        raise PrepError(f"misaligned inputs: {name_a} has {len(a)} {what} but {name_b} has {len(b)}")


def check_limits(limits: Dict[str, int], available: Dict[str, int]) -> None:
    """Refuse a --SPLIT-lines beyond the pairs a split has (checked again after any filtering)."""
    for split, n in limits.items():
        if split in available and n > available[split]:
            raise PrepError(f"--{split}-lines {n} is more than the {available[split]} {split} pairs available")


def normalize_raw(line: str) -> str:
    """Raw text cleaning: strip surrounding whitespace; the characters of :data:`LINE_BREAKS` ('\\r'
    is a line break to fairseq) become a space.

    Inner whitespace, TABs included, is kept: lines are never split on TAB.
    """
    return clean_line_breaks(line).strip()


def slice_split(split: str, side_a: List[str], side_b: List[str], limit: int,
                *others: List[str]) -> Tuple[List[str], ...]:
    """The first ``limit`` lines (0 = all) of each aligned list; refuses a limit beyond the split."""
    check_limits({split: limit}, {split: len(side_a)})
    n = limit or len(side_a)
    return tuple(lst[:n] for lst in (side_a, side_b) + others)


# ---------------------------------------------------------------------------
# IWSLT archives (WIT3 layout): train.tags.* and XML test sets


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "ftp", "file")


class Archive:
    """A WIT3 archive as a tarball (read in place, never extracted) or an extracted directory.

    Files are found by base name: ``de-en/train.tags.de-en.de`` and a plain
    ``train.tags.de-en.de`` in the directory both answer ``train.tags.de-en.de``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise PrepError(f"missing input: {self.path}")

    def read(self, names: Sequence[str]) -> Dict[str, List[str]]:
        """The lines of each named member; PrepError naming those missing."""
        found: Dict[str, List[str]] = {}
        if self.path.is_dir():
            for name in names:
                for candidate in [self.path / name, *sorted(self.path.glob(f"*/{name}"))]:
                    if candidate.is_file():
                        found[name] = read_lines(candidate)
                        break
        else:
            wanted = set(names)
            try:
                with tarfile.open(self.path, "r:*") as tar:
                    for member in tar:
                        base = member.name.rsplit("/", 1)[-1]
                        if member.isfile() and base in wanted and base not in found:
                            data = tar.extractfile(member).read()
                            try:
                                found[base] = split_text(data.decode("utf-8"))
                            except UnicodeDecodeError as err:
                                raise PrepError(f"{self.path}:{member.name}: not UTF-8 ({err.reason})") from None
            except (tarfile.TarError, OSError, EOFError) as err:
                raise PrepError(f"{self.path}: not a readable tar archive ({err})") from None
        missing = [n for n in names if n not in found]
        if missing:
            raise PrepError(f"{self.path} lacks {', '.join(missing)}")
        return found


def train_tags_lines(lines: Iterable[str], drop: Sequence[str], strip: Sequence[str]) -> List[str]:
    """The text of a WIT3 ``train.tags`` file: lines containing any of ``drop`` are removed and
    the ``strip`` strings (tags) deleted, as the grep -v / sed steps of fairseq's prepare scripts."""
    out = []
    for line in lines:
        if any(tag in line for tag in drop):
            continue
        for tag in strip:
            line = line.replace(tag, "")
        out.append(line)
    return out


_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def xml_segments(lines: Iterable[str]) -> List[str]:
    """The ``<seg>`` texts of a WIT3 XML file, XML entities left as they are.

    Implements ``grep '<seg id' | sed -e 's/<seg id="[0-9]*">\\s*//g' -e 's/\\s*<\\/seg>\\s*//g'``.
    """
    return [_SEG_CLOSE.sub("", _SEG_OPEN.sub("", line)) for line in lines if "<seg id" in line]


def unescape_segment(seg: str) -> str:
    """Raw text of a segment: XML entities unescaped, whitespace stripped and runs collapsed."""
    return " ".join(html.unescape(seg).split())


def download(url: str, dest_dir: Path) -> Path:
    """Download ``url`` into ``dest_dir`` (named after the URL), resuming a partial download.

    A finished download is reused when its ``.url`` stamp names the same URL.
    Progress goes to stderr. Any failure is a one-line PrepError.
    """
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, part, stamp = dest_dir / name, dest_dir / f"{name}.part", dest_dir / f"{name}.url"
    if stamp.is_file() and stamp.read_text().strip() == url:
        if dest.is_file():
            log(f"using {dest} (downloaded before from {url})")
            return dest
    else:
        for stale in (dest, part):
            if stale.exists():
                stale.unlink()
        stamp.write_text(url + "\n")
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    log(f"downloading {url} -> {dest}" + (f" (resuming at {start:,} bytes)" if start else ""))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status = getattr(response, "status", None) or 200
            if start and status != 206:
                start = 0  # the server ignored the range: start again
            size = response.headers.get("Content-Length")
            total = int(size) + start if size and size.isdigit() else None
            done, last = start, time.monotonic()
            with open(part, "ab" if start else "wb") as f:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    done += len(block)
                    if time.monotonic() - last > 5:
                        last = time.monotonic()
                        log(f"  {done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total else ""))
            if total is not None and done < total:
                raise PrepError(f"download of {url} stopped at {done:,} of {total:,} bytes; rerun to resume")
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # the partial file is already complete
            pass
        else:
            raise PrepError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PrepError(f"download of {url} failed: {reason} (rerun to resume)") from None
    part.rename(dest)
    log(f"downloaded {dest} ({dest.stat().st_size:,} bytes)")
    return dest


# ---------------------------------------------------------------------------
# parallel line processing


_WORKER_FN = None


def _init_worker(factory, factory_args):
    global _WORKER_FN
    _WORKER_FN = factory(*factory_args)


def _run_chunk(chunk):
    return [_WORKER_FN(line) for line in chunk]


def parallel_map(factory: Callable, factory_args: tuple, lines: Sequence[str], workers: int,
                 label: str, chunk: int = 2000) -> List[str]:
    """``factory(*factory_args)`` builds a line -> line function; apply it to every line,
    in ``workers`` processes when > 1, keeping the order; progress on stderr."""
    progress = Progress(label, len(lines))
    chunks = [lines[i:i + chunk] for i in range(0, len(lines), chunk)]
    out: List[str] = []
    if workers <= 1 or len(chunks) <= 1:
        fn = factory(*factory_args)
        for part in chunks:
            out.extend(fn(line) for line in part)
            progress.update(len(out))
    else:
        import multiprocessing

        with multiprocessing.Pool(min(workers, len(chunks)), _init_worker, (factory, factory_args)) as pool:
            for part in pool.imap(_run_chunk, chunks):
                out.extend(part)
                progress.update(len(out))
    if not lines:
        progress.update(0)
    return out


# ---------------------------------------------------------------------------
# BPE


def learn_subword_nmt(lines: Iterable[str], merges: int, code_path: Path) -> None:
    """Joint BPE as ``subword-nmt learn-bpe -s MERGES`` (min frequency 2) on the given lines."""
    from subword_nmt.learn_bpe import learn_bpe

    with writing(code_path), open(code_path, "w", encoding="utf-8") as out:
        learn_bpe(lines, out, merges)


def check_codes(source: Path) -> None:
    """Refuse a missing file, or one that is not subword-nmt BPE codes (an optional
    ``#version:`` line, then one merge per line: two symbols separated by a space)."""
    if not Path(source).is_file():
        raise PrepError(f"missing input file: {source} (--bpe-codes)")
    lines = read_lines(source)
    start = 1 if lines and lines[0].startswith("#version:") else 0
    if len(lines) == start:
        raise PrepError(f"--bpe-codes {source}: no merges in the file")
    for n, line in enumerate(lines[start:], start + 1):
        if len(line.strip("\r\n ").split(" ")) != 2:
            raise PrepError(f"--bpe-codes {source}: line {n} is not a merge of two symbols: {line[:60]!r}")


def subword_nmt_encoder(code_path: str) -> Callable[[str], str]:
    """The line function of ``subword-nmt apply-bpe -c CODE`` (separator '@@')."""
    from subword_nmt.apply_bpe import BPE

    with open(code_path, encoding="utf-8") as f:
        bpe = BPE(f)
    return bpe.process_line


def learn_sentencepiece(lines: List[str], vocab_size: int, prefix: Path, threads: int) -> None:
    """Train a joint sentencepiece BPE model (model_type=bpe, character_coverage=1.0) on the lines;
    write ``PREFIX.model`` and ``PREFIX.vocab`` (``piece<TAB>score`` lines).

    The trainer hands the model back in memory and we write both files, each through a temporary
    name: sentencepiece's own writer ignores write errors and leaves a truncated model on a full disk.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, num_threads=threads, minloglevel=2,
        )
    except RuntimeError as err:
        text = " ".join(str(err).split()) or repr(err)
        too_high = re.search(r"Vocabulary size too high.*", text)
        if too_high:
            raise PrepError(f"--vocab-size {vocab_size} is too large for this training text: "
                            f"{too_high.group(0)}") from None
        raise PrepError(f"sentencepiece training failed: {text}") from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    model_path, vocab_path = Path(f"{prefix}.model"), Path(f"{prefix}.vocab")
    with writing(model_path), atomic_write(model_path, "wb") as f:
        f.write(proto)
    with writing(vocab_path), atomic_write(vocab_path, newline="\n") as f:
        f.write(vocab)


def encode_sentencepiece(model: Path, lines: List[str], threads: int) -> List[str]:
    """Each line as space-separated sentencepiece pieces (undone by ``--remove-bpe sentencepiece``)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [" ".join(pieces) for pieces in sp.encode(lines, out_type=str, num_threads=threads)]


# ---------------------------------------------------------------------------
# output directory and stages


def _record_value(value):
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, (list, tuple)):
        return [_record_value(v) for v in value]
    return value


class Prep:
    """One output directory: argument record, stage skipping and no silent overwrite.

    Each stage builds ``OUT/NAME.partial`` and renames it to ``OUT/NAME`` when
    finished, so an existing ``OUT/NAME`` is a finished stage and a rerun skips it.
    ``prep.json`` is written last. The arguments are recorded in
    ``OUT/.prep-args.json``; a rerun with other arguments (``out``, ``workers``
    and ``force`` aside) is refused unless ``--force``.
    """

    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out)
        self.force = bool(getattr(args, "force", False))
        self.args = {k: _record_value(v) for k, v in sorted(vars(args).items())}
        self.same_args = False  # set by check(): OUT holds a run with these arguments

    def path(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def done(self, name: str) -> bool:
        return self.path(name).exists()

    def will_build(self, name: str) -> bool:
        """Whether stage NAME will run (it is not finished with these arguments); valid after check()."""
        return not (self.same_args and self.done(name))

    def check(self) -> bool:
        """Before any work: True when OUT is finished with the same arguments (nothing to do).
        PrepError when OUT holds a preparation with other arguments, or files of its own,
        unless --force (which rebuilds, removing only this command's outputs)."""
        if not self.out.exists():
            return False
        if not self.out.is_dir():
            raise PrepError(f"--out {self.out} exists and is not a directory")
        if self.force:
            return False
        record = self.path(ARGS_FILE)
        if record.is_file():
            try:
                old = read_json(record, "argument record")
            except FileProblem as err:
                raise PrepError(f"{err}; pass --force to start again") from None
            diff = [k for k in sorted(set(old) | set(self.args))
                    if k not in NOT_COMPARED and old.get(k) != self.args.get(k)]
            if diff:
                k = diff[0]
                raise PrepError(
                    f"{self.out} was prepared with other arguments (--{k.replace('_', '-')}: {old.get(k)!r} then, "
                    f"{self.args.get(k)!r} now); pass --force to discard it and start again, or use another --out")
            self.same_args = True
            return self.done("prep.json")
        foreign = sorted(p.name for p in self.out.iterdir()
                         if p.name not in OWNED and p.name != "orig" and not p.name.endswith(".partial"))
        if foreign:
            raise PrepError(f"--out {self.out} exists and holds other files ({', '.join(foreign[:3])}); "
                            "use a new or empty directory, or pass --force (it removes only this command's outputs)")
        return False

    def begin(self) -> None:
        """After the inputs passed their checks: create OUT, remove this command's old outputs unless
        they are being resumed with the same arguments, and record the arguments."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.same_args:
            for p in self.out.iterdir():
                if p.name in OWNED or p.name.endswith(".partial"):
                    log(f"removing old output {p}")
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        with writing(self.path(ARGS_FILE)):
            write_json(self.path(ARGS_FILE), self.args, indent=1)

    def stage(self, name: str, build: Callable[[Path], None]) -> Path:
        """Run ``build(tmpdir)`` unless OUT/NAME is finished; returns OUT/NAME."""
        final, tmp = self.path(name), self.path(name + ".partial")
        if final.exists():
            log(f"{name}/: finished before, skipping")
            return final
        with writing(tmp):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        start = time.monotonic()
        log(f"{name}/: building")
        build(tmp)
        with writing(final):
            tmp.rename(final)
        log(f"{name}/: done ({time.monotonic() - start:.1f}s)")
        return final


# ---------------------------------------------------------------------------
# the common tail: BPE, BPE'd text, fairseq-preprocess, prep.json


@dataclass(frozen=True)
class Task:
    """What a corpus's preparation produces; the fixed fields of prep.json."""

    name: str
    src: str
    tgt: str
    bpe: str  # "subword_nmt" or "sentencepiece"
    moses_tokenized: bool
    lowercase: bool


def write_data(tmp: Path, task: Task, splits: Dict[str, Tuple[List[str], List[str]]],
               refs: Dict[str, List[str]]) -> None:
    """Write ``data/SPLIT.{src,tgt}`` and the raw references ``data/SPLIT.ref.TGT``; refuses an empty split
    and sides of different lengths. The characters of :data:`LINE_BREAKS` inside a line become a space
    (on both sides and in the references), so that every reader sees the same lines."""
    for split, (src_lines, tgt_lines) in splits.items():
        if not src_lines:
            raise PrepError(f"the {split} split is empty: the input has too few usable pairs")
        check_same_length(f"{split}.{task.src}", src_lines, f"{split}.{task.tgt}", tgt_lines)
        cleaned = 0
        for lang, lines in ((task.src, src_lines), (task.tgt, tgt_lines)):
            out = [clean_line_breaks(line) for line in lines]
            cleaned += sum(a != b for a, b in zip(out, lines))
            write_lines(tmp / f"{split}.{lang}", out)
        log(f"{split}: {len(src_lines):,} pairs")
        if cleaned:
            log(f"{split}: {cleaned:,} sentences held a line-break character inside (\\r, \\v, \\f, \\x1c-\\x1e, "
                f"\\x85, \\u2028 or \\u2029); each became a space")
    for split, lines in refs.items():
        write_lines(tmp / f"{split}.ref.{task.tgt}", [clean_line_breaks(line) for line in lines])


def fairseq_preprocess_exe() -> str:
    """The ``fairseq-preprocess`` console script next to this Python (else on PATH)."""
    exe = Path(sys.executable).with_name("fairseq-preprocess")
    if exe.is_file():
        return str(exe)
    found = shutil.which("fairseq-preprocess")
    if not found:
        raise PrepError("fairseq-preprocess not found next to python or on PATH; "
                        "install fairseq (the 'fairseq' extra)")
    return found


def binarize(text: Path, dest: Path, task: Task, workers: int) -> None:
    """Stock ``fairseq-preprocess --joined-dictionary`` of text/{train,valid,test} into ``dest``, then
    :func:`check_binarized` against the text's line counts."""
    cmd = [fairseq_preprocess_exe(), "--source-lang", task.src, "--target-lang", task.tgt,
           "--trainpref", str(text / "train"), "--validpref", str(text / "valid"),
           "--testpref", str(text / "test"), "--destdir", str(dest),
           "--joined-dictionary", "--workers", str(workers)]
    dest.mkdir(parents=True, exist_ok=True)
    log_file = dest / "preprocess.out"  # fairseq-preprocess itself writes preprocess.log there
    log("running " + " ".join(cmd) + f" (its output: {log_file})")
    env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    # its output goes to DEST/preprocess.out (the console shows the stage's outcome only); a traceback is
    # kept back and its last line becomes our one-line error
    held: List[str] = []
    log_error: Optional[OSError] = None
    out = None
    try:
        out = open(log_file, "w", encoding="utf-8", buffering=1)
    except OSError as err:
        log_error = err
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          encoding="utf-8", errors="replace", env=env) as proc:
        for line in proc.stdout:
            if out is not None:
                try:
                    out.write(line)
                except OSError as err:  # a full disk: fairseq-preprocess fails on it too, and says so below
                    log_error, out = err, None
            if held or line.startswith("Traceback (most recent call last)"):
                held.append(line)
    if out is not None:
        try:
            out.close()
        except OSError as err:
            log_error = err
    if proc.returncode != 0:
        last = next((x.strip() for x in reversed(held) if x.strip()), "")
        if "No space left on device" in last or "Read-only file system" in last or "Disk quota" in last:
            reason = last.split("] ", 1)[-1].split(":", 1)[0].strip()
            raise PrepError(f"cannot write {dest}: {reason} (fairseq-preprocess failed)")
        detail = f": {last[-300:]}" if last else f" (its output: {log_file})"
        raise PrepError(f"fairseq-preprocess failed with exit status {proc.returncode}{detail}")
    if held:  # a traceback, yet exit status 0: show it
        sys.stderr.write("".join(held))
    if log_error is not None:
        raise PrepError(os_error_line(log_error, log_file, "cannot write"))
    check_binarized(text, dest, task)


def binarized_count(prefix: Path) -> Optional[int]:
    """The number of sentences fairseq's dataset reader finds at ``prefix`` (``.idx``/``.bin``), or None
    when it finds no dataset there. Imports fairseq (the only place here that does)."""
    import warnings

    quiet = logging.getLogger("fairseq")  # no import-time INFO lines, no "loaded N examples" per file
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fairseq.data import data_utils

            dataset = data_utils.load_indexed_dataset(str(prefix), None)
    finally:
        quiet.setLevel(level)
    return None if dataset is None else len(dataset)


def check_binarized(text: Path, dest: Path, task: Task) -> None:
    """Every split of both languages in ``dest`` holds as many sentences as its text file has lines;
    one-line PrepError otherwise (the text and the binarized data would not be the same corpus)."""
    for split in SPLITS:
        for lang in (task.src, task.tgt):
            expected = count_lines(text / f"{split}.{lang}")
            prefix = dest / f"{split}.{task.src}-{task.tgt}.{lang}"
            try:
                found = binarized_count(prefix)
            except Exception as err:  # noqa: BLE001 -- fairseq's reader raises many kinds
                raise PrepError(f"cannot read the binarized {prefix}: {' '.join(str(err).split())[:200]}") from None
            if found is None:
                raise PrepError(f"fairseq-preprocess wrote no {prefix}.idx/.bin")
            if found != expected:
                raise PrepError(f"fairseq-preprocess wrote {found:,} {split} sentences to {prefix}.bin but "
                                f"{text / f'{split}.{lang}'} has {expected:,} lines: a line holds a character "
                                f"fairseq takes for a line end")


def finish(prep: Prep, task: Task, args: argparse.Namespace, *, merges: int = 0, vocab_size: int = 0,
           codes: Optional[Path] = None, extra: Optional[Dict[str, object]] = None) -> int:
    """Stages bpe/, text/ and bin/ from a finished data/, then prep.json.

    subword-nmt: learn ``merges`` merges on train src+tgt (or copy ``codes``);
    sentencepiece: train a ``vocab_size`` BPE model on train src+tgt. Both are
    applied to every split; the references are copied beside the BPE'd text.
    ``extra``: more prep.json keys (e.g. IWSLT17's ``test_set``), written before ``args``.
    """
    data = prep.path("data")
    workers = args.workers

    def build_bpe(tmp: Path) -> None:
        if task.bpe == "subword_nmt" and codes is not None:
            write_lines(tmp / "code", read_lines(codes))
            log(f"BPE codes copied from {codes}")
            return
        train = read_lines(data / f"train.{task.src}") + read_lines(data / f"train.{task.tgt}")
        log(f"learning joint {task.bpe} BPE on {len(train):,} lines "
            + (f"({merges} merges)" if task.bpe == "subword_nmt" else f"(vocab {vocab_size})"))
        if task.bpe == "subword_nmt":
            learn_subword_nmt(train, merges, tmp / "code")
        else:
            learn_sentencepiece(train, vocab_size, tmp / "spm", workers)

    def build_text(tmp: Path) -> None:
        model = prep.path("bpe", "code" if task.bpe == "subword_nmt" else "spm.model")
        for split in SPLITS:
            for lang in (task.src, task.tgt):
                lines = read_lines(data / f"{split}.{lang}")
                if task.bpe == "subword_nmt":
                    encoded = parallel_map(subword_nmt_encoder, (str(model),), lines, workers,
                                           f"apply BPE {split}.{lang}")
                else:
                    log(f"apply sentencepiece {split}.{lang}: {len(lines):,} lines")
                    encoded = encode_sentencepiece(model, lines, workers)
                write_lines(tmp / f"{split}.{lang}", encoded)
            ref = data / f"{split}.ref.{task.tgt}"
            if ref.is_file():
                with writing(tmp / ref.name):
                    shutil.copyfile(ref, tmp / ref.name)

    prep.stage("bpe", build_bpe)
    text = prep.stage("text", build_text)
    prep.stage("bin", lambda tmp: binarize(text, tmp, task, workers))
    meta = {
        "schema": SCHEMA, "task": task_name(task, args), "smoke": bool(getattr(args, "smoke", False)),
        "src": task.src, "tgt": task.tgt,
        "bpe": task.bpe, "remove_bpe": task.bpe,
        "moses_tokenized": task.moses_tokenized, "lowercase": task.lowercase,
        "bin": "bin", "text": "text",
        "bpe_model": "bpe/code" if task.bpe == "subword_nmt" else "bpe/spm.model",
        "references": {s: f"text/{s}.ref.{task.tgt}" for s in SPLITS if (text / f"{s}.ref.{task.tgt}").is_file()},
        "counts": {s: count_lines(text / f"{s}.{task.src}") for s in SPLITS},
        **(extra or {}),
        "args": prep.args,
    }
    counts = {s: count_lines(text / f"{s}.{task.tgt}") for s in SPLITS}
    if counts != meta["counts"]:
        raise PrepError(f"{text}: the {task.src} and {task.tgt} files differ in length ({meta['counts']} and "
                        f"{counts} lines); pass --force to prepare again")
    with writing(prep.path("prep.json")):
        write_json(prep.path("prep.json"), meta)
    log(f"finished: {prep.path('prep.json')} (train {meta['counts']['train']:,}, "
        f"valid {meta['counts']['valid']:,}, test {meta['counts']['test']:,} pairs)")
    return 0


def already_done(prep: Prep) -> int:
    """The message and exit status of a rerun on a finished OUT with the same arguments."""
    log(f"{prep.out} is already prepared with these arguments ({prep.path('prep.json')}); skipping")
    return 0


# ---------------------------------------------------------------------------
# raw, line-aligned text files (IWSLT17 --raw, Multi30k)


def raw_inputs(directory: Path, names: Dict[str, List[str]], src: str, tgt: str,
               limits: Dict[str, int]) -> Dict[str, List[Tuple[Path, Path]]]:
    """The (src, tgt) file pairs of each split (``DIR/NAME.LANG[.gz]``), checked to exist and
    align, and the --SPLIT-lines limits checked against their line counts."""
    if not Path(directory).is_dir():
        raise PrepError(f"missing input directory: {directory}")
    files = {split: [(find_text(directory, n, src), find_text(directory, n, tgt)) for n in stems]
             for split, stems in names.items()}
    counts = check_aligned([pair for pairs in files.values() for pair in pairs])
    check_limits(limits, {split: sum(counts[a] for a, _ in pairs) for split, pairs in files.items()})
    return files


def read_raw_splits(files: Dict[str, List[Tuple[Path, Path]]]) -> Dict[str, Tuple[List[str], List[str]]]:
    """The (src lines, tgt lines) of each split: the concatenation of its files in order."""
    texts = {}
    for split, pairs in files.items():
        src_lines, tgt_lines = [], []
        for a, b in pairs:
            src_lines += read_lines(a)
            tgt_lines += read_lines(b)
        texts[split] = (src_lines, tgt_lines)
    return texts


def build_raw_data(tmp: Path, task: Task, texts: Dict[str, Tuple[List[str], List[str]]],
                   limits: Dict[str, int]) -> None:
    """data/ from raw (untokenized) text: lines normalized (:func:`normalize_raw`), train pairs
    with an empty side dropped, the first ``limits[split]`` pairs kept; the valid/test targets
    are also written as the references."""
    splits, refs = {}, {}
    for split, (src_lines, tgt_lines) in texts.items():
        src_lines = [normalize_raw(x) for x in src_lines]
        tgt_lines = [normalize_raw(x) for x in tgt_lines]
        if split == "train":
            kept = [(s, t) for s, t in zip(src_lines, tgt_lines) if s and t]
            if len(kept) < len(src_lines):
                log(f"train: dropped {len(src_lines) - len(kept)} pairs with an empty side")
            src_lines, tgt_lines = [s for s, _ in kept], [t for _, t in kept]
        src_lines, tgt_lines = slice_split(split, src_lines, tgt_lines, limits[split])
        splits[split] = (src_lines, tgt_lines)
        if split != "train":
            refs[split] = tgt_lines
    write_data(tmp, task, splits, refs)


def split_names_args(parser: Parser, defaults: Dict[str, str]) -> None:
    """--train/--valid/--test: comma-separated file stems of each split under the raw directory."""
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=name_list, default=defaults[split], metavar="NAMES",
                            help=f"{split} files: comma-separated stems, NAME -> NAME.LANG or NAME.LANG.gz, "
                                 "concatenated in order")
