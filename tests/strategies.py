"""Hypothesis strategies for random layer tables: small sizes with zeros and repeats so ties are common."""

from __future__ import annotations

from hypothesis import strategies as st

from cachefit.core.layers import Layer, LayerTable, SharedTensor

SIZES = st.one_of(st.just(0), st.integers(0, 12), st.sampled_from([5, 10, 100]))


@st.composite
def tables(draw: st.DrawFn, max_layers: int = 7, shared: bool = True) -> LayerTable:
    count = draw(st.integers(1, max_layers))
    layers = []
    for index in range(count):
        uses = ()
        if shared and index > 0 and draw(st.integers(0, 4)) == 0:
            owner = draw(st.integers(0, index - 1))
            tensor = draw(st.sampled_from(["tied", "other"]))
            uses = (SharedTensor(tensor, f"l{owner}", draw(SIZES)),)
        layers.append(Layer(f"l{index}", draw(SIZES), draw(SIZES), draw(SIZES), draw(SIZES), 0.0, (), uses))
    # One tensor (owner, tensor) has one size, and its owner counts it in weight_bytes, as real tied weights do.
    sizes: dict[tuple[str, str], int] = {}
    for layer in layers:
        for s in layer.shared:
            sizes.setdefault((s.owner, s.tensor), s.bytes)
    owned: dict[str, int] = {}
    for (owner, _), size in sizes.items():
        owned[owner] = owned.get(owner, 0) + size
    fixed = [Layer(x.name, x.weight_bytes + owned.get(x.name, 0), x.activation_bytes, x.workspace_bytes,
                   x.kv_cache_bytes, 0.0, (),
                   tuple(SharedTensor(s.tensor, s.owner, sizes[(s.owner, s.tensor)]) for s in x.shared))
             for x in layers]
    return LayerTable(name="random", layers=tuple(fixed), input_bytes=draw(SIZES))
