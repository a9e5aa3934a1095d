"""Closed contours of a binary mask, every slice at once: marching squares at level 0.5.

For a 0/1 mask the iso-line at 0.5 has its vertices exactly half-way between the centres of a
voxel inside and a 4-neighbour outside, so it is what ``skimage.measure.find_contours(mask,
0.5)`` gives (its saddle rule too: diagonal foreground voxels stay apart), but without a
Python step per line segment: skimage spent ~1 s assembling the segments of a 200-slice
External. Here the vertices are the pairs of 4-neighbour voxels that differ, so only the
boundary is visited; segments are oriented so the inside is always on the same side (each
vertex then starts exactly one), each vertex's segment comes from a table of the cell beside
it, and they are chained into rings by pointer jumping, in O(n log n) numpy operations for n
vertices. Collinear vertices are
dropped (lossless: the remaining corners describe the same polygon).
"""

from __future__ import annotations

import numpy as np

# cell corners as (row, col) offsets and their bits in the cell's case code
_CORNERS = ((0, 0), (0, 1), (1, 1), (1, 0))
_BIT = {corner: 1 << n for n, corner in enumerate(_CORNERS)}
# the cell's edges: top, right, bottom, left; each joins two corners, its vertex is their midpoint
_TOP, _RIGHT, _BOTTOM, _LEFT = range(4)
_EDGE_CORNERS = (((0, 0), (0, 1)), ((0, 1), (1, 1)), ((1, 0), (1, 1)), ((0, 0), (1, 0)))
_EDGE_POINT = np.array([[0.0, 0.5], [0.5, 1.0], [1.0, 0.5], [0.5, 0.0]])
# the segments of each case, unoriented; saddles (5, 10) cut each foreground corner off alone
_CASES: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((_LEFT, _TOP),),
    14: ((_LEFT, _TOP),),
    2: ((_TOP, _RIGHT),),
    13: ((_TOP, _RIGHT),),
    4: ((_RIGHT, _BOTTOM),),
    11: ((_RIGHT, _BOTTOM),),
    8: ((_BOTTOM, _LEFT),),
    7: ((_BOTTOM, _LEFT),),
    3: ((_LEFT, _RIGHT),),
    12: ((_LEFT, _RIGHT),),
    6: ((_TOP, _BOTTOM),),
    9: ((_TOP, _BOTTOM),),
    5: ((_LEFT, _TOP), (_RIGHT, _BOTTOM)),
    10: ((_TOP, _RIGHT), (_BOTTOM, _LEFT)),
}


def _oriented(code: int, start: int, end: int) -> tuple[int, int]:
    """The segment directed so that the inside corner of its start edge lies to its left."""
    first, second = _EDGE_CORNERS[start]
    inside = np.array(first if code & _BIT[first] else second, dtype=float)
    d = _EDGE_POINT[end] - _EDGE_POINT[start]
    f = inside - _EDGE_POINT[start]
    return (start, end) if d[0] * f[1] - d[1] * f[0] < 0 else (end, start)


def _next_edge_table() -> np.ndarray:
    """(16, 4): for a cell's case code and the edge a segment starts on, the edge it ends on
    (-1: no segment of that case starts there)."""
    table = np.full((16, 4), -1, dtype=np.int64)
    for code, segments in _CASES.items():
        for a, b in segments:
            start, end = _oriented(code, a, b)
            table[code, start] = end
    return table


_NEXT_EDGE = _next_edge_table()


def _cell_codes(flat: np.ndarray, cells: np.ndarray, width: int) -> np.ndarray:
    """Case codes of the cells whose top-left pixel is ``cells`` (flat indices, rows ``width``)."""
    corners = flat.view(np.uint8)
    codes: np.ndarray = (
        corners[cells] | (corners[cells + 1] << 1) | (corners[cells + width + 1] << 2) | (corners[cells + width] << 3)
    )
    return codes


def _successors(
    flat: np.ndarray, vertices: np.ndarray, width: int, edges: tuple[int, int], step: int, ids: np.ndarray
) -> np.ndarray:
    """Id of the vertex where the segment starting at each of ``vertices`` ends.

    A vertex lies on edge ``edges[0]`` of the cell whose top-left pixel it is named by, and on
    ``edges[1]`` of the cell ``step`` before; its segment runs through whichever of the two
    has one starting there. ``ids[edge]``: a cell's top-left pixel → its vertex on that edge.
    """
    here = _NEXT_EDGE[_cell_codes(flat, vertices, width), edges[0]]
    there = _NEXT_EDGE[_cell_codes(flat, vertices - step, width), edges[1]]
    inside = here >= 0
    cells = np.where(inside, vertices, vertices - step)
    ends = np.where(inside, here, there)
    successors: np.ndarray = cells + ids[ends]
    return successors


def _vertex_points(ids: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(slice index, (n, 2) row/col) of vertex ids on the padded grid: below ``size``, the
    midpoint right of pixel ``id``; from ``size`` on, the midpoint below pixel ``id - size``."""
    slices, rows, cols = shape
    size = slices * rows * cols
    across = ids < size
    z, rest = np.divmod(np.where(across, ids, ids - size), rows * cols)
    r, c = np.divmod(rest, cols)
    points = np.stack([r + np.where(across, 0.0, 0.5), c + np.where(across, 0.5, 0.0)], axis=1)
    return z, points


def _cycles(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation made of cycles: each element's cycle (its smallest member) and its
    distance to the cycle's last element, by pointer jumping."""
    n = nxt.size
    head = np.arange(n)
    jump = nxt.copy()
    while True:
        widened = np.minimum(head, head[jump])
        if np.array_equal(widened, head):
            break
        head, jump = widened, jump[jump]
    last = nxt == head  # the element whose successor is its cycle's head
    dist = (~last).astype(np.int64)
    step = np.where(last, np.arange(n), nxt)
    while True:  # list ranking: the last elements point at themselves with distance 0
        dist = dist + dist[step]
        following = step[step]
        if np.array_equal(following, step):
            return head, dist
        step = following


def _links(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The iso-line's vertices (sorted ids), each one's successor (an index into them) and the
    padded grid's shape.

    Only the boundary is visited: a vertex is a pair of 4-neighbour pixels that differ, found by
    two whole-volume comparisons, and only the two cells beside each vertex are looked at.
    Building every cell's case code and its 3-D nonzero instead took ~0.1 s per External.
    """
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    shape = (padded.shape[0], padded.shape[1], padded.shape[2])
    flat, width, n_pixels = padded.ravel(), shape[2], padded.size
    across = np.flatnonzero(flat[1:] != flat[:-1])  # pixel differs from its right neighbour
    down = np.flatnonzero(flat[width:] != flat[:-width])  # pixel differs from the one below
    ids = np.array([0, n_pixels + 1, width, n_pixels])  # a cell's vertex on top, right, bottom, left
    src = np.concatenate([across, n_pixels + down])
    dst = np.concatenate(
        [
            _successors(flat, across, width, (_TOP, _BOTTOM), width, ids),
            _successors(flat, down, width, (_LEFT, _RIGHT), 1, ids),
        ]
    )
    return src, np.searchsorted(src, dst), shape


def mask_rings(mask: np.ndarray, min_area: float = 0.0) -> dict[int, list[np.ndarray]]:
    """Closed rings of a (z, y, x) boolean mask by slice, each (n, 2) fractional (row, col).

    The closing vertex is not repeated (DICOM CLOSED_PLANAR implies the last edge); rings
    enclosing less than ``min_area`` pixels² are left out, and so are slices with no ring.
    """
    src, nxt, shape = _links(mask)
    if src.size == 0:
        return {}
    head, dist = _cycles(nxt)
    ring_order = np.lexsort((-dist, head))
    slices, points = _vertex_points(src[ring_order], shape)
    points -= 1.0  # undo the padding
    ring_of = head[ring_order]
    first = np.flatnonzero(np.r_[True, ring_of[1:] != ring_of[:-1]])
    size = np.diff(np.r_[first, ring_of.size])
    position = np.arange(ring_of.size)
    begin = np.repeat(first, size)
    after = np.where(position + 1 < begin + np.repeat(size, size), position + 1, begin)
    before = np.where(position > begin, position - 1, begin + np.repeat(size, size) - 1)
    d_in, d_out = points - points[before], points[after] - points
    keep = np.abs(d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) > 1e-9
    twice_area = points[:, 0] * points[after, 1] - points[:, 1] * points[after, 0]
    areas = 0.5 * np.abs(np.add.reduceat(twice_area, first))
    kept_per_ring = np.add.reduceat(keep.astype(np.int64), first)
    rings: dict[int, list[np.ndarray]] = {}
    for ring in np.flatnonzero((kept_per_ring >= 3) & (areas >= min_area)):
        span = slice(int(first[ring]), int(first[ring] + size[ring]))
        rings.setdefault(int(slices[first[ring]]), []).append(points[span][keep[span]])
    return dict(sorted(rings.items()))
