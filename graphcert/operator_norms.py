"""Sound upper bounds on operator norms in float64, pushed outward: largest singular values of dense and sparse
matrices, convolutions as sparse matrices or circular convolutions (DFT), average pooling. Pure numpy/scipy, no
ONNX: the lipschitz pass folds these numbers into its graphs, and tests check them against dense SVDs."""
from __future__ import annotations

import dataclasses

import numpy as np
# scipy (0.2 s to import) loads where a norm is computed: verify's float32 analysis imports this module only for
# its rules.

from graphcert.ops import WindowGeometry

# Outward slack on every folded constant: covers float64 rounding in the SVD / eigenvalue solvers.
RELATIVE_SLACK = 1e-6
# Matrices whose smaller side is at most this get an exact largest singular value (dense Gram eigenvalue).
EXACT_SIDE = 2048


def outward(value: float) -> float:
    """A float64 bound pushed up by the relative slack."""
    return float(value) * (1.0 + RELATIVE_SLACK) + np.finfo(np.float64).tiny


# Gram matrices up to this side take numpy's full eigenvalue solver; larger ones scipy's for the top one only.
SMALL_GRAM = 256


def spectral_norm(matrix) -> float:
    """A sound upper bound on the largest singular value of a dense or sparse matrix (float64).

    Exact up to rounding (largest eigenvalue of the smaller Gram matrix) when a side is at most EXACT_SIDE;
    otherwise sqrt(||A||_1·||A||_inf), which bounds it for every matrix.
    """
    sparse = hasattr(matrix, "toarray")   # a scipy.sparse matrix (scipy, 0.2 s to import, loads only when needed)
    matrix = matrix.astype(np.float64) if sparse else np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    if min(rows, cols) == 0:
        return 0.0
    if min(rows, cols) <= EXACT_SIDE:
        gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix
        gram = gram.toarray() if sparse else gram
        n = gram.shape[0]
        if n <= SMALL_GRAM:
            top = np.linalg.eigvalsh(gram)[-1]
        else:
            import scipy.linalg
            top = scipy.linalg.eigvalsh(gram, subset_by_index=[n - 1, n - 1])[0]
        # eigvalsh is backward stable: the error is a few ulps of ||G|| <= its largest row sum.
        error = 8 * n * np.finfo(np.float64).eps * float(np.abs(gram).sum(axis=1).max())
        return outward(np.sqrt(max(top, 0.0) + error))
    magnitude = abs(matrix)
    column_sums = np.asarray(magnitude.sum(axis=0)).max()
    row_sums = np.asarray(magnitude.sum(axis=1)).max()
    return outward(np.sqrt(column_sums * row_sums))


def ConvGeometry(node, spatial: list[int], kernel: list[int]) -> WindowGeometry:  # noqa: N802
    """The window layout of a Conv / pooling node on its input's spatial size, counting a ceil-mode window that
    starts in the end padding too: runtimes differ on it, and an extra row never lowers a norm bound."""
    return dataclasses.replace(WindowGeometry.of(node, spatial, kernel), count_padding_starts=True)


def conv_matrix(weight: np.ndarray, geometry: WindowGeometry, group: int) -> "scipy.sparse.csr_matrix":
    """The dense-layout (out × in) matrix of a Conv without bias, as a sparse matrix."""
    import scipy.sparse
    cout, cin_group = weight.shape[:2]
    spatial, out_spatial = geometry.spatial, geometry.out
    n_in, n_out = int(np.prod(spatial)), int(np.prod(out_spatial))
    rank = len(spatial)
    out_idx = np.indices(out_spatial).reshape(rank, -1)                   # [rank, n_out]
    tap_idx = np.indices(geometry.kernel).reshape(rank, -1)                # [rank, taps]
    stride = np.array(geometry.strides)[:, None, None]
    begin = np.array(geometry.begin)[:, None, None]
    dilation = np.array(geometry.dilations)[:, None, None]
    position = out_idx[:, :, None] * stride - begin + tap_idx[:, None, :] * dilation   # [rank, n_out, taps]
    size = np.array(spatial)[:, None, None]
    valid = ((position >= 0) & (position < size)).all(axis=0)
    flat_in = np.ravel_multi_index(tuple(np.where(valid, position, 0)), spatial)       # [n_out, taps]
    out_channel = np.arange(cout)[:, None, None, None]
    in_channel = (out_channel // (cout // group)) * cin_group + np.arange(cin_group)[None, :, None, None]
    rows = out_channel * n_out + np.arange(n_out)[None, None, :, None]
    cols = in_channel * n_in + flat_in[None, None]
    values = weight.reshape(cout, cin_group, 1, -1).astype(np.float64) * valid[None, None]
    shape = (cout * n_out, weight.shape[1] * group * n_in)
    rows, cols, values = (np.broadcast_to(a, values.shape).reshape(-1) for a in (rows, cols, values))
    keep = values != 0
    return scipy.sparse.coo_matrix((values[keep], (rows[keep], cols[keep])), shape=shape).tocsr()


def circular_conv_norm(weight: np.ndarray, geometry: WindowGeometry, group: int) -> float:
    """The operator norm of the stride-1 circular convolution on the padded input size.

    The padded, strided conv is (keep strided outputs) ∘ (circular conv on the padded torus) ∘ (zero-embed),
    with no wrap-around for the kept outputs; the outer maps have norm <= 1. The circular conv is
    diagonalised by the DFT: its norm is the largest singular value of the kernel's DFT at any frequency.
    """
    cout, cin_group = weight.shape[:2]
    torus = geometry.padded
    per_group = cout // group
    top = 0.0
    for g in range(group):
        kernel = np.zeros((per_group, cin_group, *torus), dtype=np.float64)
        for tap in np.ndindex(*geometry.kernel):
            offset = tuple(t * d for t, d in zip(tap, geometry.dilations))
            kernel[(slice(None), slice(None), *offset)] += weight[(slice(g * per_group, (g + 1) * per_group),
                                                                   slice(None), *tap)]
        spectrum = np.fft.fftn(kernel, axes=tuple(range(2, 2 + len(torus))))
        blocks = np.moveaxis(spectrum.reshape(per_group, cin_group, -1), -1, 0)     # [freq, out, in]
        top = max(top, float(np.linalg.svd(blocks, compute_uv=False)[:, 0].max()))
    # FFT rounding is a few ulps of the kernel's L1 mass per entry.
    error = 16 * np.finfo(np.float64).eps * float(np.abs(weight).sum()) * np.log2(max(np.prod(torus), 2))
    return outward(top + error)


def average_pool_norm(geometry: WindowGeometry, count_include_pad: int, ceil_mode: int) -> float:
    """AveragePool is a Kronecker product of per-axis averaging matrices (divisors factor over axes too)."""
    norm = 1.0
    for axis, size in enumerate(geometry.spatial):
        positions = geometry.taps(axis)
        inside = (positions >= 0) & (positions < size)
        if count_include_pad and not ceil_mode:
            divisor = np.full(len(positions), geometry.kernel[axis], dtype=np.float64)
        else:
            # The number of real elements: never more than the op's divisor, so every entry is at least as
            # large, and the norm of a non-negative matrix grows with its entries.
            divisor = np.maximum(inside.sum(axis=1), 1).astype(np.float64)
        matrix = np.zeros((len(positions), size))
        for o in range(len(positions)):
            np.add.at(matrix[o], positions[o][inside[o]], 1.0 / divisor[o])
        norm *= spectral_norm(matrix)
    return norm
