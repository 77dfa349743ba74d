"""ALIGNN (property model, BatchNorm in eval mode) and ALIGNN-FF (`alignn_atomwise`, LayerNorm) as Flax modules.

The modules work on one flat (batched) graph: atoms, directed bonds (edges) and bond pairs (line-graph edges),
each with a 0/1 weight that switches padding slots off. Names follow the torch module paths with "." before an
index replaced by "_" (`alignn_layers_0/node_update/src_gate`, `edge_embedding_1/layer_1`, ...), so checkpoint
conversion is a mechanical rename (see `converters.alignn`).

Maths (reference/alignn.md §1): MLPLayer(u) = SiLU(Norm(Linear(u))); RBF_k(v) = exp(-γ (v - μ_k)²) with centres μ
and γ = 1/spacing from the checkpoint. Edge-gated graph convolution on a graph with edges e = s -> t:
    M_e = src_gate(X)[s] + dst_gate(X)[t] + edge_gate(Y)_e ;  σ = sigmoid(M) ;
    h_i = Σ_{t_e = i} σ_e ⊙ dst_update(X)[s_e] / (Σ_{t_e = i} σ_e + 1e-6) ;
    X' = X + SiLU(bn_nodes(src_update(X) + h)) ;  Y' = Y + SiLU(bn_edges(M)).
An ALIGNN layer is an EGGC on the crystal graph (atoms, bonds) then one on the line graph (bonds, bond pairs);
GCN layers are EGGCs on the crystal graph; the readout is fc(mean over each crystal's atoms) then the link
(identity, exp for "log", sigmoid for "logit"). Padding atoms, edges and pairs never influence real ones.
Per-layer activations are sown into the "intermediates" collection (names as in the fixtures' intermediates.npz).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

GATE_EPS = 1e-6


def norm_layer(kind: str, name: str) -> nn.Module:
    """BatchNorm1d in eval mode (`kind="batch"`: params scale/bias, batch_stats mean/var) or LayerNorm
    (`kind="layer"`: params scale/bias), eps 1e-5 as in torch."""
    if kind == "batch":
        return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class MLPLayer(nn.Module):
    """Linear -> Norm -> SiLU; submodules `layer_0` (Dense) and `layer_1` (Norm)."""

    features: int
    norm: str = "batch"

    @nn.compact
    def __call__(self, u):
        u = nn.Dense(self.features, name="layer_0")(u)
        return nn.silu(norm_layer(self.norm, "layer_1")(u))


class RBFExpansion(nn.Module):
    """exp(-γ (v - μ_k)²) over `bins` centres; parameters `centers` [bins] and `gamma` [] (from the checkpoint)."""

    vmin: float
    vmax: float
    bins: int

    @nn.compact
    def __call__(self, v):
        centers = self.param("centers", lambda _: jnp.linspace(self.vmin, self.vmax, self.bins, dtype=jnp.float32))
        gamma = self.param("gamma", lambda _: jnp.asarray((self.bins - 1) / (self.vmax - self.vmin)))
        return jnp.exp(-gamma.astype(v.dtype) * (v[:, None] - centers.astype(v.dtype)) ** 2)


class EdgeGatedGraphConv(nn.Module):
    """Residual edge-gated graph convolution (see the module docstring).

    Call: (x [n, H], y [m, H], src [m], dst [m], weight [m] 0/1) -> (x' [n, H], y' [m, H]).
    """

    features: int
    norm: str = "batch"

    @nn.compact
    def __call__(self, x, y, src, dst, weight):
        dense = lambda name: nn.Dense(self.features, name=name)  # noqa: E731
        m = dense("src_gate")(x)[src] + dense("dst_gate")(x)[dst] + dense("edge_gate")(y)
        sigma = nn.sigmoid(m) * weight[:, None]
        bh = dense("dst_update")(x)
        n = x.shape[0]
        num = jax.ops.segment_sum(sigma * bh[src], dst, num_segments=n)
        den = jax.ops.segment_sum(sigma, dst, num_segments=n)
        pre = dense("src_update")(x) + num / (den + GATE_EPS)
        self.sow("intermediates", "node_preact", pre)
        self.sow("intermediates", "gate_preact_m", m)
        x = x + nn.silu(norm_layer(self.norm, "bn_nodes")(pre))
        y = y + nn.silu(norm_layer(self.norm, "bn_edges")(m))
        return x, y


class ALIGNNConv(nn.Module):
    """EGGC on the crystal graph (`node_update`) then on the line graph (`edge_update`)."""

    features: int
    norm: str = "batch"

    @nn.compact
    def __call__(self, x, y, z, g, lg):
        x, y_mid = EdgeGatedGraphConv(self.features, self.norm, name="node_update")(x, y, *g)
        y, z = EdgeGatedGraphConv(self.features, self.norm, name="edge_update")(y_mid, z, *lg)
        return x, y_mid, y, z


class ALIGNN(nn.Module):
    """ALIGNN on a flat batched graph.

    Attributes: the `config.json["model"]` fields; `norm` "batch" (property model) or "layer" (ALIGNN-FF);
    `remat` recomputes each layer in the backward pass (memory knob, same numbers).

    Call:
      atom_features: [n, atom_input_features] (species distribution @ CGCNN table).
      bond_length: [m] Å.  cos: [t] bond cosines.
      edges: (src [m], dst [m], weight [m]) atom indices.  pairs: (e1 [t], e2 [t], weight [t]) edge indices.
      node_graph: [n] crystal index of each atom.  node_weight: [n] 1 for real atoms, 0 for padding.
      num_graphs: number of crystals (static).
    Returns:
      [num_graphs, output_features], link applied.
    """

    alignn_layers: int = 4
    gcn_layers: int = 4
    edge_input_features: int = 80
    triplet_input_features: int = 40
    embedding_features: int = 64
    hidden_features: int = 256
    output_features: int = 1
    link: str = "identity"
    norm: str = "batch"
    remat: bool = False

    @nn.compact
    def __call__(self, atom_features, bond_length, cos, edges, pairs, node_graph, node_weight, num_graphs):
        h, norm = self.hidden_features, self.norm
        sow = lambda name, value: self.sow("intermediates", name, value)  # noqa: E731
        angle_rbf = RBFExpansion(-1.0, 1.0, self.triplet_input_features, name="angle_embedding_0")(cos)
        z = MLPLayer(self.embedding_features, norm, name="angle_embedding_1")(angle_rbf)
        z = MLPLayer(h, norm, name="angle_embedding_2")(z)
        x = MLPLayer(h, norm, name="atom_embedding")(atom_features)
        edge_rbf = RBFExpansion(0.0, 8.0, self.edge_input_features, name="edge_embedding_0")(bond_length)
        y = MLPLayer(self.embedding_features, norm, name="edge_embedding_1")(edge_rbf)
        y = MLPLayer(h, norm, name="edge_embedding_2")(y)
        for name, value in (("angle_rbf", angle_rbf), ("z_embedding", z), ("x_embedding", x)):
            sow(name, value)
        sow("edge_rbf", edge_rbf)
        sow("y_embedding", y)
        conv_cls = nn.remat(ALIGNNConv) if self.remat else ALIGNNConv
        gcn_cls = nn.remat(EdgeGatedGraphConv) if self.remat else EdgeGatedGraphConv
        for i in range(self.alignn_layers):
            x, y_mid, y, z = conv_cls(h, norm, name=f"alignn_layers_{i}")(x, y, z, edges, pairs)
            sow(f"alignn{i}_x", x)
            sow(f"alignn{i}_y_mid", y_mid)
            sow(f"alignn{i}_y", y)
            if i < self.alignn_layers - 1:
                sow(f"alignn{i}_z", z)
        for i in range(self.gcn_layers):
            x, y = gcn_cls(h, norm, name=f"gcn_layers_{i}")(x, y, *edges)
            sow(f"gcn{i}_x", x)
            sow(f"gcn{i}_y", y)
        total = jax.ops.segment_sum(x * node_weight[:, None], node_graph, num_segments=num_graphs)
        count = jax.ops.segment_sum(node_weight, node_graph, num_segments=num_graphs)
        mean = total / jnp.maximum(count, 1.0)[:, None]
        sow("readout_mean", mean)
        out = nn.Dense(self.output_features, name="fc")(mean)
        sow("fc_out_before_link", out)
        if self.link == "log":
            return jnp.exp(out)
        if self.link == "logit":
            return nn.sigmoid(out)
        return out
