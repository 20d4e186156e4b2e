"""The atom/layout algebra: unions, refinement, cuts, expansions, kept positions."""
import numpy as np
import pytest

from onnxprune.core.layout import Atoms, LayoutError, Segment, cut, expand, kept_positions, resolve, tile, unify


def lay(*atoms_):
    return tuple(Segment(a) for a in atoms_)


def test_union_of_concat_with_single_atom_splits_it():
    atoms = Atoms()
    a, b, c = atoms.new(4), atoms.new(6), atoms.new(10)
    unify(lay(a, b), lay(c), atoms)
    leaves = atoms.leaves(c)
    assert [atoms.size(x) for x in leaves] == [4, 6]
    assert atoms.find(leaves[0]) == atoms.find(a) and atoms.find(leaves[1]) == atoms.find(b)


def test_split_applies_to_every_member_of_a_class():
    atoms = Atoms()
    a, b, c, d = atoms.new(5), atoms.new(5), atoms.new(2), atoms.new(3)
    atoms.union(a, b)
    unify(lay(c, d), lay(a), atoms)
    assert [atoms.size(x) for x in atoms.leaves(b)] == [2, 3]


def test_fixed_reasons_survive_union_and_split():
    atoms = Atoms()
    a, b = atoms.new(6), atoms.new(6)
    atoms.fix(a, "graph output")
    atoms.union(a, b)
    head, tail = atoms.split_leaf(atoms.find(b), 2)
    assert atoms.is_fixed(head) and atoms.is_fixed(tail)


def test_unify_refuses_sizes_and_expansions_that_disagree():
    atoms = Atoms()
    a, b = atoms.new(4), atoms.new(5)
    with pytest.raises(LayoutError):
        unify(lay(a), lay(b), atoms)
    c, d = atoms.new(2), atoms.new(3)
    with pytest.raises(LayoutError):  # 3 positions per channel against 2: no block structure
        unify(expand(lay(c), 3), expand(lay(d), 2), atoms)


def test_cut_splits_at_boundaries_and_refuses_inside_an_expansion():
    atoms = Atoms()
    a = atoms.new(10)
    piece = cut(lay(a), 3, 7, atoms)
    assert [atoms.size(s.atom) for s in piece] == [4]
    assert [atoms.size(s.atom) for s in resolve(lay(a), atoms)] == [3, 4, 3]
    b = atoms.new(4)
    with pytest.raises(LayoutError):
        cut(expand(lay(b), 3), 1, 6, atoms)


def test_kept_positions_for_expanded_and_tiled_layouts():
    atoms = Atoms()
    a = atoms.new(3)
    kept = {a: np.array([0, 2])}
    # channel-major flatten: channel c covers positions c*2, c*2+1
    assert kept_positions(expand(lay(a), 2), atoms, kept).tolist() == [0, 1, 4, 5]
    # channels-last flatten over 2 pixels: [c0 c1 c2 | c0 c1 c2]
    assert kept_positions(tile(lay(a), 2), atoms, kept).tolist() == [0, 2, 3, 5]


def test_concat_of_the_same_tensor_twice():
    atoms = Atoms()
    a, c = atoms.new(3), atoms.new(6)
    unify(lay(a, a), lay(c), atoms)
    leaves = atoms.leaves(c)
    assert atoms.find(leaves[0]) == atoms.find(leaves[1]) == atoms.find(a)


def test_channels_tied_in_blocks_to_match_an_expanded_layout():
    # hidden units (32) against heads (4) x head_dim (8): hidden channels go in blocks of 8
    atoms = Atoms()
    hidden, heads = atoms.new(32), atoms.new(4)
    unify(lay(hidden), expand(lay(heads), 8), atoms)
    assert [(atoms.find(s.atom) == atoms.find(heads), s.expand) for s in resolve(lay(hidden), atoms)] == [(True, 8)]
    kept = {atoms.find(heads): np.array([0, 2])}
    assert kept_positions(lay(hidden), atoms, kept).tolist() == list(range(0, 8)) + list(range(16, 24))
