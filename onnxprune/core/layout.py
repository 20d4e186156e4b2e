"""Channel atoms and layouts: the index algebra behind dependency groups.

An *atom* is a run of channels that must be pruned index-for-index together.
Atoms live in a union-find: `union(a, b)` says channel i of a and channel i of b
go together. An atom can be *split* into consecutive parts when a layout cuts
through it (a Concat of two tensors added to one conv output, say); splitting a
class splits every member of it, so the refinement stays consistent.

A *layout* describes one tensor axis as a sequence of segments. A segment
`(atom, expand)` covers `size(atom) * expand` positions: position
`c * expand + j` belongs to channel c of the atom (Flatten of [C,H,W] into
C*H*W gives expand = H*W). Concat appends layouts, Split and Slice cut them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class LayoutError(Exception):
    """Two layouts cannot be made to agree (different expansion, misaligned cut)."""


@dataclass(frozen=True)
class Segment:
    atom: int
    expand: int = 1


Layout = tuple  # tuple[Segment, ...]


class Atoms:
    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._parts: dict[int, list[Segment]] = {}  # refinements: consecutive parts, or one coarser atom
        self.fixed: dict[int, list[str]] = {}  # class rep -> reasons it cannot shrink
        self.origin: list[str] = []  # node that created each atom

    # -- basic union-find ----------------------------------------------------
    def new(self, size: int, origin: str = "") -> int:
        if size <= 0:
            raise LayoutError(f"atom of size {size}")
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        self.origin.append(origin)
        return len(self._parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:
            self._parent[a], a = root, self._parent[a]
        return root

    def size(self, a: int) -> int:
        return self._size[self.find(a)]

    def leaves(self, a: int) -> list[int]:
        return [seg.atom for seg in self.leaf_segments(a)]

    def leaf_segments(self, a: int, expand: int = 1) -> list[Segment]:
        """Atom a as current leaf classes, each with how many positions one of its channels spans."""
        rep = self.find(a)
        parts = self._parts.get(rep)
        if parts is None:
            return [Segment(rep, expand)]
        out: list[Segment] = []
        for p in parts:
            out.extend(self.leaf_segments(p.atom, expand * p.expand))
        return out

    def is_fixed(self, a: int) -> bool:
        return self.find(a) in self.fixed

    # -- refinement ------------------------------------------------------------
    def split_leaf(self, leaf: int, first: int) -> tuple[int, int]:
        """Split a leaf class into [first | rest] and return the two new leaves."""
        rep = self.find(leaf)
        assert rep not in self._parts
        total = self._size[rep]
        if not 0 < first < total:
            raise LayoutError(f"cannot split {total} channels at {first}")
        a = self.new(first, self.origin[rep])
        b = self.new(total - first, self.origin[rep])
        self._parts[rep] = [Segment(a), Segment(b)]
        if rep in self.fixed:
            self.fixed[a] = list(self.fixed[rep])
            self.fixed[b] = list(self.fixed[rep])
        return a, b

    def coarsen_leaf(self, leaf: int, factor: int) -> int:
        """Tie a leaf class's channels in consecutive blocks of `factor`: it becomes a coarser
        atom expanded by `factor` (hidden units grouped into attention heads)."""
        rep = self.find(leaf)
        assert rep not in self._parts
        total = self._size[rep]
        if factor <= 1 or total % factor:
            raise LayoutError(f"cannot group {total} channels in blocks of {factor}")
        coarse = self.new(total // factor, self.origin[rep])
        self._parts[rep] = [Segment(coarse, factor)]
        if rep in self.fixed:
            self.fixed[coarse] = list(self.fixed[rep])
        return coarse

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise LayoutError(f"union of {self._size[ra]} and {self._size[rb]} channels")
        if ra in self._parts or rb in self._parts:
            _align([Segment(ra)], [Segment(rb)], self)
            ra, rb = self.find(ra), self.find(rb)
            if ra == rb:
                return
        self._parent[rb] = ra
        if rb in self._parts:
            self._parts.setdefault(ra, self._parts[rb])
            del self._parts[rb]
        if rb in self.fixed:
            self.fixed.setdefault(ra, []).extend(self.fixed.pop(rb))

    def fix(self, a: int, reason: str) -> None:
        for leaf in self.leaves(a):
            reasons = self.fixed.setdefault(self.find(leaf), [])
            if reason not in reasons:
                reasons.append(reason)


# -- layouts -----------------------------------------------------------------------
def resolve(layout: Layout, atoms: Atoms) -> list[Segment]:
    """The layout in terms of current leaf classes."""
    out: list[Segment] = []
    for seg in layout:
        out.extend(atoms.leaf_segments(seg.atom, seg.expand))
    return out


def layout_size(layout: Layout, atoms: Atoms) -> int:
    return sum(atoms.size(s.atom) * s.expand for s in layout)


def _head(segs: list[Segment], i: int, atoms: Atoms) -> Segment:
    """Segment i as a current leaf, refining it in place if its class was split meanwhile."""
    while True:
        seg = segs[i]
        rep = atoms.find(seg.atom)
        parts = atoms._parts.get(rep)
        if parts is None:
            segs[i] = Segment(rep, seg.expand)
            return segs[i]
        segs[i:i + 1] = [Segment(p.atom, seg.expand * p.expand) for p in parts]


def _align(x: list[Segment], y: list[Segment], atoms: Atoms) -> None:
    """Union two layouts position by position, splitting atoms where boundaries differ."""
    x, y = list(x), list(y)
    i = j = 0
    while i < len(x) and j < len(y):
        sx, sy = _head(x, i, atoms), _head(y, j, atoms)
        if sx.expand != sy.expand:
            # One side spans more positions per channel: tie the other's channels in blocks.
            small, large = (sx, sy) if sx.expand < sy.expand else (sy, sx)
            if large.expand % small.expand:
                raise LayoutError("layouts expand channels differently")
            atoms.coarsen_leaf(small.atom, large.expand // small.expand)
            continue
        nx, ny = atoms.size(sx.atom), atoms.size(sy.atom)
        if nx == ny:
            atoms.union(sx.atom, sy.atom)
            i += 1
            j += 1
        elif nx < ny:
            head, tail = atoms.split_leaf(sy.atom, nx)
            atoms.union(sx.atom, head)
            y[j] = Segment(tail, sy.expand)
            i += 1
        else:
            head, tail = atoms.split_leaf(sx.atom, ny)
            atoms.union(head, sy.atom)
            x[i] = Segment(tail, sx.expand)
            j += 1
    if i < len(x) or j < len(y):
        raise LayoutError("layouts of different sizes")


def unify(x: Layout, y: Layout, atoms: Atoms) -> None:
    if layout_size(x, atoms) != layout_size(y, atoms):
        raise LayoutError(
            f"layouts of {layout_size(x, atoms)} and {layout_size(y, atoms)} channels")
    _align(list(x), list(y), atoms)


def cut(layout: Layout, start: int, stop: int, atoms: Atoms) -> Layout:
    """Positions [start, stop) of a layout as a layout of their own (splits atoms at the cuts)."""
    out: list[Segment] = []
    segs = list(layout)
    pos = i = 0
    while i < len(segs) and pos < stop:
        seg = _head(segs, i, atoms)
        n = atoms.size(seg.atom) * seg.expand
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            if (lo - pos) % seg.expand or (hi - pos) % seg.expand:
                raise LayoutError("cut falls inside an expanded channel")
            a, b = (lo - pos) // seg.expand, (hi - pos) // seg.expand
            atom = seg.atom
            if a > 0:
                _, atom = atoms.split_leaf(atom, a)
            if b - a < atoms.size(atom):
                atom, _ = atoms.split_leaf(atom, b - a)
            out.append(Segment(atom, seg.expand))
        pos += n
        i += 1
    return tuple(out)


def expand(layout: Layout, factor: int) -> Layout:
    return tuple(Segment(s.atom, s.expand * factor) for s in layout)


def tile(layout: Layout, times: int) -> Layout:
    return tuple(layout) * times


def kept_positions(layout: Layout, atoms: Atoms, kept: dict[int, np.ndarray]) -> np.ndarray:
    """Positions of a layout that survive, given kept channel indices per leaf class."""
    parts = []
    pos = 0
    for seg in resolve(layout, atoms):
        n = atoms.size(seg.atom)
        keep = kept.get(seg.atom)
        if keep is None:
            idx = np.arange(n * seg.expand)
        else:
            idx = (keep[:, None] * seg.expand + np.arange(seg.expand)[None, :]).reshape(-1)
        parts.append(idx + pos)
        pos += n * seg.expand
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
