"""SAGPool (Lee, Lee and Kang, "Self-Attention Graph Pooling", ICML 2019) on PyTorch Geometric's layers.

The graph classifier of the paper's graph experiments (EL_SPEC 6): GCN convolutions (Kipf and Welling
2017, ``GCNConv``) with self-attention pooling (``SAGPooling``, whose scores are a GCN too), in the two
architectures of Lee et al.:

* ``hierarchical`` (SAGPool_h, the default): three blocks of GCN (ReLU) + SAGPooling; after each, the
  readout ``[global max || global mean]``; the three readouts summed;
* ``global`` (SAGPool_g): three GCN layers (ReLU), their outputs concatenated, one SAGPooling, one readout.

Then the MLP of both: Linear(2h, h), ReLU, dropout, Linear(h, h/2), ReLU, Linear(h/2, classes). The model
returns logits (the loss applies the softmax), one row per graph.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["POOLINGS", "SAGPoolNet"]

POOLINGS = ("hierarchical", "global")


class SAGPoolNet(nn.Module):
    """SAGPool_h / SAGPool_g (see the module's docstring) for ``num_features`` node features and
    ``num_classes`` graph classes; ``hidden`` channels, ``ratio`` of the nodes kept by each pooling,
    ``dropout`` before the second linear layer."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 128, ratio: float = 0.5,
                 dropout: float = 0.5, pooling: str = "hierarchical"):
        super().__init__()
        from torch_geometric.nn import GCNConv, SAGPooling

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling, self.dropout = pooling, float(dropout)
        self.convs = nn.ModuleList([GCNConv(num_features, hidden), GCNConv(hidden, hidden), GCNConv(hidden, hidden)])
        if pooling == "hierarchical":
            self.pools = nn.ModuleList([SAGPooling(hidden, ratio) for _ in range(3)])
        else:
            self.pools = nn.ModuleList([SAGPooling(3 * hidden, ratio)])
        width = 2 * hidden if pooling == "hierarchical" else 6 * hidden
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, hidden // 2)
        self.lin3 = nn.Linear(hidden // 2, num_classes)

    @staticmethod
    def _readout(x, batch, size):
        from torch_geometric.nn import global_max_pool, global_mean_pool

        return torch.cat([global_max_pool(x, batch, size), global_mean_pool(x, batch, size)], dim=1)

    def forward(self, data) -> torch.Tensor:
        x, edge_index, batch = data.x, data.edge_index, data.batch
        if batch is None:
            batch = edge_index.new_zeros(x.size(0))
        size = int(data.num_graphs) if hasattr(data, "num_graphs") else int(batch.max()) + 1
        if self.pooling == "hierarchical":
            out = 0
            for conv, pool in zip(self.convs, self.pools):
                x = F.relu(conv(x, edge_index))
                x, edge_index, _, batch, _, _ = pool(x, edge_index, None, batch)
                out = out + self._readout(x, batch, size)
        else:
            layers = []
            for conv in self.convs:
                x = F.relu(conv(x, edge_index))
                layers.append(x)
            x, edge_index, _, batch, _, _ = self.pools[0](torch.cat(layers, dim=1), edge_index, None, batch)
            out = self._readout(x, batch, size)
        out = F.relu(self.lin1(out))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = F.relu(self.lin2(out))
        return self.lin3(out)
