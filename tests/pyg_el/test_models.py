"""pyg_el.models.SAGPoolNet (Lee et al. 2019, SAGPool_h and SAGPool_g): logits per graph, gradients to every
parameter, the two architectures different, on batches of the small TU dataset conftest.py writes."""
import pytest

pytest.importorskip("torch_geometric")

import torch  # noqa: E402
from torch_geometric.loader import DataLoader  # noqa: E402

from pyg_el.data import load_tu  # noqa: E402
from pyg_el.models import POOLINGS, SAGPoolNet  # noqa: E402


@pytest.fixture(scope="module")
def toy(shared_root):
    return load_tu("TOY", shared_root, download=False)


@pytest.fixture(scope="module")
def batch(toy):
    return next(iter(DataLoader(toy[:7], batch_size=7)))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_logits_have_one_row_per_graph(toy, batch, pooling):
    torch.manual_seed(0)
    model = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, pooling=pooling).eval()
    logits = model(batch)
    assert logits.shape == (7, 2) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # a graph's logits do not depend on the other graphs of its batch (pooling and readout are per graph)
    single = model(next(iter(DataLoader(toy[3:4], batch_size=1))))
    torch.testing.assert_close(single[0], logits[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_gradients_reach_every_parameter(toy, batch, pooling):
    torch.manual_seed(0)
    model = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, dropout=0.0, pooling=pooling)
    torch.nn.functional.cross_entropy(model(batch), batch.y).backward()
    names = [name for name, _ in model.named_parameters()]
    assert any(name.startswith("pools.") for name in names)  # the attention GCNs of SAGPooling
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name.endswith("select.weight"):
            # PyG's SelectTopK scores w x / |w| with a 1x1 w (SAGPooling's score is one channel): only w's
            # sign matters, its gradient is 0 up to rounding; the attention GCN (pools.*.gnn) learns instead
            assert param.shape == (1, 1), name
            continue
        assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_a_few_steps_lower_the_loss(toy, batch):
    torch.manual_seed(0)
    model = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch), batch.y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_hierarchical_and_global_are_different_networks(toy, batch):
    torch.manual_seed(0)
    h = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, pooling="hierarchical").eval()
    torch.manual_seed(0)
    g = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, pooling="global").eval()
    assert len(h.pools) == 3 and len(g.pools) == 1
    assert h.lin1.in_features == 2 * 16 and g.lin1.in_features == 6 * 16  # [max || mean] of h vs of 3 GCNs
    assert not torch.allclose(h(batch), g(batch))


def test_dropout_only_in_training_and_a_graph_without_batch_vector(toy):
    torch.manual_seed(0)
    model = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, dropout=0.5)
    data = toy[0]
    assert data.batch is None
    model.eval()
    first, second = model(data), model(data)
    assert first.shape == (1, 2) and torch.equal(first, second)
    model.train()
    torch.manual_seed(1)
    a = model(data)
    torch.manual_seed(2)
    assert not torch.equal(a, model(data))


def test_pooling_ratio_sets_the_nodes_kept(toy, batch):
    model = SAGPoolNet(toy.num_features, toy.num_classes, hidden=16, ratio=0.5)
    assert all(pool.ratio == 0.5 for pool in model.pools)
    kept = model.pools[0](torch.randn(batch.num_nodes, 16), batch.edge_index, None, batch.batch)[3]
    sizes = torch.bincount(batch.batch, minlength=7)
    assert torch.equal(torch.bincount(kept, minlength=7), torch.ceil(0.5 * sizes).long())


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of hierarchical, global, got 'max'"):
        SAGPoolNet(3, 2, pooling="max")
