"""pyg_el.data: PyTorch Geometric's TUDataset read from the three local forms of a TU dataset (a small one
that conftest.py writes in the TU raw format), its one-line errors, and the paper's seeded 80/10/10 splits."""
import zipfile

import pytest

pytest.importorskip("torch_geometric")

import torch  # noqa: E402

from pyg_el.data import DataError, load_tu, split_indices, split_sizes, tu_raw_dir  # noqa: E402

FORMS = ("zip", "unpacked", "raw")


def _graph_as_written(data):
    """(node labels, undirected edges i < j, class) of a loaded graph, to compare with what was written."""
    edges = {(int(i), int(j)) for i, j in data.edge_index.t().tolist() if i < j}
    both = {(int(i), int(j)) for i, j in data.edge_index.t().tolist()}
    assert both == edges | {(j, i) for i, j in edges}, "every edge in both directions"
    return data.x.argmax(dim=1).tolist(), sorted(edges), int(data.y)


@pytest.mark.parametrize("form", FORMS)
def test_each_local_form_loads_the_written_graphs(toy_root, toy_graphs, form):
    dataset = load_tu("TOY", toy_root(form), download=False)
    assert len(dataset) == len(toy_graphs) == 60
    assert dataset.num_features == 3  # node labels 0, 1, 2 one-hot, as SAGPool's input
    assert dataset.num_classes == 2  # TU labels 1 and 2 -> classes 0 and 1
    for data, graph in zip(dataset, toy_graphs):
        assert data.x.shape == (len(graph["labels"]), 3)
        assert float(data.x.sum()) == len(graph["labels"])  # one-hot rows
        assert _graph_as_written(data) == (graph["labels"], graph["edges"], graph["y"])


def test_the_three_forms_give_identical_tensors(toy_root):
    loaded = [load_tu("TOY", toy_root(form), download=False) for form in FORMS]
    for other in loaded[1:]:
        for a, b in zip(loaded[0], other):
            assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.y, b.y)


def test_an_archive_is_unpacked_into_pygs_raw_folder_once(toy_root):
    root = toy_root("zip")
    load_tu("TOY", root, download=False)
    raw = tu_raw_dir(root, "TOY")
    assert sorted(p.name for p in raw.iterdir()) == [f"TOY_{p}.txt" for p in
                                                    ("A", "graph_indicator", "graph_labels", "node_labels")]
    assert not list(root.glob("**/*.partial"))
    (root / "TOY.zip").unlink()  # the unpacked copy is used from now on
    assert len(load_tu("TOY", root, download=False)) == 60


def _one_line_error(err, *words):
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_no_local_copy_and_no_download_names_root(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        load_tu("TOY", root, download=False)
    _one_line_error(err, "--root", str(root), "TOY.zip", "downloading is off")


def test_a_damaged_archive_is_a_one_line_error_and_leaves_nothing_half_unpacked(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "TOY.zip").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError) as err:
        load_tu("TOY", root, download=False)
    _one_line_error(err, "--root", "TOY.zip")
    assert not tu_raw_dir(root, "TOY").exists()
    assert not list(root.glob("**/*.partial"))


def test_an_archive_without_the_tu_files_is_refused(toy_files, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with zipfile.ZipFile(root / "TOY.zip", "w") as zf:  # everything but TOY_A.txt
        for f in toy_files.glob("TOY_*.txt"):
            if f.name != "TOY_A.txt":
                zf.write(f, f"TOY/{f.name}")
    with pytest.raises(DataError) as err:
        load_tu("TOY", root, download=False)
    _one_line_error(err, "--root", "TOY_A.txt")
    assert not tu_raw_dir(root, "TOY").exists()


@pytest.mark.parametrize("name", ["", "../TOY", "TOY/raw", "TO Y"])
def test_a_bad_dataset_name_names_the_flag(tmp_path, name):
    with pytest.raises(DataError) as err:
        load_tu(name, tmp_path, download=False)
    _one_line_error(err, "--dataset")


def test_unreadable_tu_files_are_a_one_line_error(toy_root):
    root = toy_root("raw")
    (tu_raw_dir(root, "TOY") / "TOY_graph_indicator.txt").write_text("1\nnot a number\n")
    with pytest.raises(DataError) as err:
        load_tu("TOY", root, download=False)
    _one_line_error(err, "--dataset TOY", "cannot read", "--root")


def test_too_few_graphs_for_a_split_are_refused(write_dataset, tmp_path):
    root = write_dataset(9, tmp_path / "root")
    with pytest.raises(DataError) as err:
        load_tu("TOY", root, download=False)
    _one_line_error(err, "--dataset TOY", "9 graphs", "10 or more")
    assert len(load_tu("TOY", write_dataset(10, tmp_path / "root10"), download=False)) == 10


def test_graphs_without_node_features_are_refused(toy_root):
    root = toy_root("raw")
    (tu_raw_dir(root, "TOY") / "TOY_node_labels.txt").unlink()
    with pytest.raises(DataError) as err:
        load_tu("TOY", root, download=False)
    _one_line_error(err, "--dataset TOY", "no node labels")


def test_split_sizes_are_sagpools_int_cuts():
    for n in (10, 11, 19, 60, 99, 1113, 4110):
        train, valid, test = split_sizes(n)
        assert (train, valid) == (int(0.8 * n), int(0.1 * n)) and train + valid + test == n
    assert split_sizes(60) == (48, 6, 6) and split_sizes(1113) == (890, 111, 112)


@pytest.mark.parametrize("n", [10, 60, 1113])
def test_splits_are_disjoint_and_cover_every_graph(n):
    parts = split_indices(n, seed=777)
    assert tuple(len(p) for p in parts) == split_sizes(n)
    joined = torch.cat(parts)
    assert joined.dtype == torch.long and sorted(joined.tolist()) == list(range(n))


def test_the_same_seed_gives_the_same_split_and_other_seeds_other_splits():
    state = torch.get_rng_state()
    first = split_indices(60, 5)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: torch's global RNG untouched
    torch.manual_seed(123)  # ... and not read either
    again = split_indices(60, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    tests = {tuple(sorted(split_indices(60, seed)[2].tolist())) for seed in range(5, 15)}
    assert len(tests) == 10  # runs 0..9 of --seed 5: ten different test sets
