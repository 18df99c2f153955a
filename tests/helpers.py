"""What many test modules share: the checkout's paths, the environment of the commands they start, and the
builders of the small data sets that conftest.py's fixtures cache (an IWSLT14 slice binarized by stock
fairseq-preprocess, an ImageFolder of MNIST digits).

Importable from every test module (pytest.ini puts ``tests/`` on ``sys.path``).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
PY = sys.executable
BIN = Path(sys.executable).parent  # the venv's console scripts: fairseq-train, fairseq-generate, ...
USER_DIR = str(ROOT / "fairseq_el")
# fairseq's IWSLT Transformer at its smallest: 1 + 1 layers, 32 dimensions, 2 heads (a CPU step in milliseconds)
TINY_TRANSFORMER = [
    "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def command_env(threads=None, checkout_on_path=False, **extra) -> dict:
    """The environment of a command a test starts: warnings off, ``threads`` intra-op threads (default: the
    caller's OMP_NUM_THREADS, else 2), the checkout first on PYTHONPATH when asked."""
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(threads or os.environ.get("OMP_NUM_THREADS", "2")), **extra)
    if checkout_on_path:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_tool(tool: str, *args, check: bool = True, stdin: str = None, timeout: float = 900):
    """Run the venv's console script ``tool`` (``fairseq-train``, ``fairseq-generate``, ...) with ``args`` ->
    (exit status, stdout + stderr); with ``check``, a failure raises AssertionError showing the output's end."""
    proc = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=command_env(),
                          input=stdin, timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{out[-4000:]}")
    return proc.returncode, out


def error_lines(text: str) -> list:
    return [line for line in text.splitlines() if "error:" in line]


def make_iwslt14_slice(shared_data: Path, out: Path, train: int, valid: int, test: int) -> Path:
    """``scripts/make_iwslt14_sample.py``: the first TRAIN/VALID/TEST pairs of the shared IWSLT14 De-En copy,
    BPE-encoded in ``out/text`` and binarized by fairseq-preprocess in ``out/bin``."""
    subprocess.run([PY, str(ROOT / "scripts" / "make_iwslt14_sample.py"), "--data", str(shared_data / "iwslt14-de-en"),
                    "--out", str(out), "--train", str(train), "--valid", str(valid), "--test", str(test)],
                   check=True, capture_output=True, env=command_env())
    return out


def write_mnist_folder(shared_data: Path, root: Path, train: int, val: int, classes: int = 10,
                       val_from: str = "test") -> Path:
    """An ImageFolder of MNIST digits as PNG files: ``root/train/<digit>/NNN.png``, the first ``train`` images
    of each of the first ``classes`` digits in MNIST's training set, and ``root/val/<digit>/NNN.png``, the first
    ``val`` of MNIST's test set (``val_from="test"``) or the next ``val`` of its training set
    (``val_from="train"``; their numbers go on from the training images')."""
    from PIL import Image

    from timm_el import load_mnist

    if val_from not in ("test", "train"):
        raise ValueError(f"val_from: 'test' or 'train', not {val_from!r}")
    parts = [("train", "train", train)] + [("val", val_from, val)]
    counts = {}
    for split, source, per_class in parts:
        images, labels = load_mnist(shared_data, source, limit=3000)
        start = counts.get(source, [0] * classes)  # per class: how many the splits before this one took
        seen = [0] * classes
        for image, label in zip(images, labels):
            label = int(label)
            if label >= classes or seen[label] >= start[label] + per_class:
                continue
            if seen[label] < start[label]:  # taken by the training split
                seen[label] += 1
                continue
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{seen[label]:03d}.png")
            seen[label] += 1
        if seen != [n + per_class for n in start]:
            raise AssertionError(f"MNIST {source}: {seen} images per class, wanted {per_class} more than {start}")
        counts[source] = seen
    return root


def iwslt14_prep(**counts) -> dict:
    """The ``prep.json`` the IWSLT14 preparation writes, for a slice of ``counts`` sentences per split
    (``train=200, valid=20, test=20``)."""
    return {"schema": "el-prep/1", "task": "iwslt14_de_en", "src": "de", "tgt": "en", "bpe": "subword_nmt",
            "remove_bpe": "subword_nmt", "moses_tokenized": True, "lowercase": True, "bin": "bin", "text": "text",
            "references": {}, "counts": counts, "args": {}}


def descendant(pid: int, name: str, deadline: float) -> int:
    """The process id of the first descendant of ``pid`` whose command line holds ``name`` (Linux /proc), waited
    for until ``deadline`` (``time.time()``)."""
    while time.time() < deadline:
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                kids = []
            for kid in kids:
                try:
                    if name in Path(f"/proc/{kid}/cmdline").read_bytes().decode(errors="replace"):
                        return kid
                except OSError:
                    pass
            todo += kids
        time.sleep(0.2)
    raise AssertionError(f"no {name} under process {pid}")
