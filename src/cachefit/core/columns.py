"""A layer table's layers held as columns: names and one int64 array per byte column, float64 FLOPs, and the few
layers that carry more (modules, shared tensors, splits, read bytes) whole.

A million-layer table as a million ``Layer`` records costs ~1 s to build and ~300 MB; as columns it is 48 MB and
the planners, the memory models and the fingerprint read it with numpy (issue 15). It is still a sequence of
``Layer``: indexing or iterating makes the records on demand, so code that reads a few layers stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from cachefit.core.layers import Layer

__all__ = ["BYTE_COLUMNS", "LayerColumns", "NameRange"]

BYTE_COLUMNS = ("weight_bytes", "activation_bytes", "workspace_bytes", "kv_cache_bytes")
Int64Array = npt.NDArray[np.int64]


class LayerColumns(Sequence["Layer"]):
    """The layers of a table, immutable. ``sizes`` is (n, 4) int64 in :data:`BYTE_COLUMNS` order; ``extras`` maps
    a layer's index to its whole record where it has more than the columns hold."""

    __slots__ = ("_digests", "extras", "flops", "names", "sizes")

    def __init__(self, names: tuple[str, ...], sizes: Int64Array, flops: npt.NDArray[np.float64],
                 extras: Mapping[int, Layer]) -> None:
        if sizes.shape != (len(names), 4) or flops.shape != (len(names),):
            raise ValueError(f"columns of {len(names)} layers need sizes ({len(names)}, 4) and flops "
                             f"({len(names)},), got {sizes.shape} and {flops.shape}; this is a bug")
        self.names = names
        self.sizes = np.ascontiguousarray(sizes, dtype=np.int64)
        self.flops = np.ascontiguousarray(flops, dtype=np.float64)
        self.sizes.setflags(write=False)
        self.flops.setflags(write=False)
        self.extras = dict(extras)
        self._digests: dict[bytes, str] = {}    # fingerprint per table header (LayerTable.fingerprint)

    @classmethod
    def of(cls, layers: Sequence[Layer]) -> LayerColumns:
        """Columns of ``layers`` (records, or columns already)."""
        if isinstance(layers, LayerColumns):
            return layers
        count = len(layers)
        sizes = np.fromiter((value for x in layers for value in (x.weight_bytes, x.activation_bytes,
                                                                 x.workspace_bytes, x.kv_cache_bytes)),
                            dtype=np.int64, count=4 * count).reshape(count, 4)
        flops = np.fromiter((x.flops for x in layers), dtype=np.float64, count=count)
        extras = {i: x for i, x in enumerate(layers) if x.modules or x.shared or x.splits or x.read_bytes is not None}
        return cls(tuple(x.name for x in layers), sizes, flops, extras)

    @property
    def weight_bytes(self) -> Int64Array:
        return self.sizes[:, 0]

    @property
    def activation_bytes(self) -> Int64Array:
        return self.sizes[:, 1]

    @property
    def workspace_bytes(self) -> Int64Array:
        return self.sizes[:, 2]

    @property
    def kv_cache_bytes(self) -> Int64Array:
        return self.sizes[:, 3]

    @property
    def any_shared(self) -> bool:
        return any(x.shared for x in self.extras.values())

    def cached_digest(self, header: bytes, compute: Any) -> str:
        """``compute()`` once per table header: a table's fingerprint hashes all its columns (48 MB at 1e6 layers),
        and replace() keeps the columns, so a table re-made with the same header reuses it."""
        if header not in self._digests:
            self._digests[header] = compute()
        return self._digests[header]

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Layer: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Layer, ...]: ...

    def __getitem__(self, index: int | slice) -> Layer | tuple[Layer, ...]:
        if isinstance(index, slice):
            return tuple(self._record(i) for i in range(*index.indices(len(self.names))))
        if index < 0:
            index += len(self.names)
        if not 0 <= index < len(self.names):
            raise IndexError(f"layer {index} out of range for {len(self.names)} layers")
        return self._record(index)

    def __iter__(self) -> Iterator[Layer]:
        from cachefit.core.layers import Layer

        rows = zip(self.names, self.sizes.tolist(), self.flops.tolist())
        for index, (name, (weight, activation, workspace, kv_cache), flops) in enumerate(rows):
            extra = self.extras.get(index)
            yield extra if extra is not None else Layer(name, weight, activation, workspace, kv_cache, flops)

    def _record(self, index: int) -> Layer:
        from cachefit.core.layers import Layer

        extra = self.extras.get(index)
        if extra is not None:
            return extra
        weight, activation, workspace, kv_cache = self.sizes[index].tolist()
        return Layer(self.names[index], weight, activation, workspace, kv_cache, float(self.flops[index]))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerColumns):
            return (self.names == other.names and np.array_equal(self.sizes, other.sizes)
                    and np.array_equal(self.flops, other.flops) and self.extras == other.extras)
        if isinstance(other, tuple | list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.names, self.sizes.tobytes(), self.flops.tobytes()))

    def __repr__(self) -> str:
        return f"LayerColumns({len(self.names)} layers, {len(self.extras)} with more than sizes)"


class NameRange(Sequence[str]):
    """``names[start:stop]`` without the copy: a plan's partitions list their layers as ranges over the table's
    names (slicing a million names into 1,024 tuples took 26 ms of a 67 ms plan). Equal to, and hashed as, the
    tuple of the same names."""

    __slots__ = ("_names", "_start", "_stop")

    def __init__(self, names: tuple[str, ...], start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(names):
            raise ValueError(f"names [{start}, {stop}) out of range for {len(names)} names; this is a bug")
        self._names, self._start, self._stop = names, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"name {index} out of range for {len(self)} names")
        return self._names[self._start + index]

    def __iter__(self) -> Iterator[str]:
        # A slice, not itertools.islice: islice walks from the tuple's start, O(n) per range and O(n x k) for a
        # plan's k ranges (7 s at 1e6 names on 1,024 cards).
        return iter(self._names[self._start:self._stop])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NameRange) and other._names is self._names:
            return (other._start, other._stop) == (self._start, self._stop) or tuple(self) == tuple(other)
        if isinstance(other, NameRange | tuple | list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))
