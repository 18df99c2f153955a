"""The graph adapter's test fixtures: a small TU graph-classification dataset that the tests write in the TU
raw format (no downloads), its three local forms under ``--root``, and ``pyg_el.train.main`` run in-process.

The dataset (``TOY``, 60 graphs of 2 classes): every graph a ring of 6 to 11 nodes with node labels 0, 1, 2;
class 1 graphs (TU label 2) have extra chords (denser) and mostly node label 2, class 0 graphs (TU label 1)
mostly node label 0, so SAGPool learns it in a few epochs. Files as the TU archives have them: 1-based node
and graph ids, ``NAME_A.txt`` listing every undirected edge in both directions as ``i, j``.
"""
import contextlib
import io
import random
import shutil
import zipfile
from pathlib import Path

import pytest

NAME = "TOY"
NUM_GRAPHS = 60


def make_graphs(n: int = NUM_GRAPHS, seed: int = 0) -> list:
    """``n`` graphs, classes alternating: dicts with ``labels`` (node labels, 0..2), ``edges`` (sorted
    undirected pairs ``(i, j)``, ``i < j``, node ids local to the graph, 0-based) and ``y`` (0 or 1)."""
    rng = random.Random(seed)
    graphs = []
    for g in range(n):
        y = g % 2
        size = rng.randint(6, 11)
        mix = (0.1, 0.3, 0.6) if y else (0.6, 0.3, 0.1)
        labels = rng.choices((0, 1, 2), weights=mix, k=size)
        labels[0] = 2 if y else 0  # every graph holds its class's main label at least once
        edges = {(i, (i + 1) % size) if i < (i + 1) % size else ((i + 1) % size, i) for i in range(size)}
        for _ in range(size if y else 1):
            i, j = rng.sample(range(size), 2)
            edges.add((min(i, j), max(i, j)))
        graphs.append(dict(labels=labels, edges=sorted(edges), y=y))
    return graphs


def write_tu(folder: Path, graphs: list, name: str = NAME) -> Path:
    """Write ``graphs`` as the TU text files ``folder/NAME_{A,graph_indicator,graph_labels,node_labels}.txt``
    (1-based ids, graph labels 1 and 2 as PROTEINS has them); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    a, indicator, node_labels, graph_labels = [], [], [], []
    first = 1  # global 1-based id of the current graph's first node
    for g, graph in enumerate(graphs, start=1):
        for i, j in graph["edges"]:
            a += [f"{first + i}, {first + j}", f"{first + j}, {first + i}"]
        indicator += [str(g)] * len(graph["labels"])
        node_labels += [str(label) for label in graph["labels"]]
        graph_labels.append(str(graph["y"] + 1))
        first += len(graph["labels"])
    for part, lines in (("A", a), ("graph_indicator", indicator), ("graph_labels", graph_labels),
                        ("node_labels", node_labels)):
        (folder / f"{name}_{part}.txt").write_text("\n".join(lines) + "\n")
    return folder


def place(source: Path, root: Path, form: str, name: str = NAME) -> Path:
    """Put the TU files of ``source`` into ``root`` in one of the three local forms ``load_tu`` reads:
    ``zip`` (``ROOT/NAME.zip`` as the TU archive: ``NAME/NAME_*.txt`` inside), ``unpacked``
    (``ROOT/NAME/NAME_*.txt``) or ``raw`` (PyG's ``ROOT/NAME/raw/NAME_*.txt``); returns ``root``."""
    files = sorted(source.glob(f"{name}_*.txt"))
    if form == "zip":
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / f"{name}.zip", "w") as zf:
            for f in files:
                zf.write(f, f"{name}/{f.name}")
    elif form in ("unpacked", "raw"):
        target = root / name / ("raw" if form == "raw" else "")
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)
    else:
        raise ValueError(form)
    return root


@pytest.fixture(scope="session")
def toy_graphs() -> list:
    """The graphs of the ``TOY`` dataset as written (see :func:`make_graphs`)."""
    return make_graphs()


@pytest.fixture(scope="session")
def toy_files(toy_graphs, tmp_path_factory) -> Path:
    """A folder holding ``TOY_*.txt`` (the TU files of :func:`toy_graphs`); never written into by a test."""
    return write_tu(tmp_path_factory.mktemp("tu_files"), toy_graphs)


@pytest.fixture
def toy_root(toy_files, tmp_path):
    """``toy_root(form)``: a new ``--root`` holding TOY in ``form`` (``zip``, ``unpacked`` or ``raw``)."""
    count = iter(range(100))

    def build(form: str) -> Path:
        return place(toy_files, tmp_path / f"root{next(count)}-{form}", form)

    return build


@pytest.fixture(scope="session")
def write_dataset(tmp_path_factory):
    """``write_dataset(graphs, root, form="raw", name="TOY")``: ``graphs`` (:func:`make_graphs`'s dicts; an
    int ``n``: ``make_graphs(n)``) written as the TU files of ``name`` into ``root`` in ``form``; returns
    ``root``."""
    def write(graphs, root: Path, form: str = "raw", name: str = NAME) -> Path:
        graphs = make_graphs(graphs) if isinstance(graphs, int) else graphs
        return place(write_tu(tmp_path_factory.mktemp("tu_files"), graphs, name), root, form, name)

    return write


@pytest.fixture(scope="session")
def shared_root(toy_files, tmp_path_factory) -> Path:
    """A ``--root`` with TOY (raw form) that the training tests share (PyG's processed copy made once)."""
    return place(toy_files, tmp_path_factory.mktemp("tu_root"), "raw")


@pytest.fixture(scope="session")
def train_main():
    """``train_main(*args)``: ``pyg_el.train.main(args)`` in this process -> (exit status, stdout, stderr);
    torch's thread count (``--threads``) put back afterwards."""
    import torch

    from pyg_el import train

    def call(*args):
        threads = torch.get_num_threads()
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = train.main([str(a) for a in args])
                except SystemExit as stop:  # argparse's errors
                    status = stop.code
        finally:
            torch.set_num_threads(threads)
        return status, out.getvalue(), err.getvalue()

    return call
