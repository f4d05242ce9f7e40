"""upload_arrays: one copy for a step's arrays of any dtypes, every view with its values and on a 16-byte boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.transfer import ALIGN_BYTES, upload_arrays


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_views_keep_values_and_start_aligned(dtype):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-5, 1000, size=n).astype(dtype) for n in (3, 1, 7, 0, 5)]
    arrays.append(rng.integers(0, 50, size=(3, 5)).astype(dtype))  # a 2-D block table
    out = upload_arrays(arrays, "cpu")
    base = out[0].data_ptr()
    for host, view in zip(arrays, out, strict=True):
        assert view.shape == host.shape and torch.equal(view, torch.from_numpy(host))
        assert (view.data_ptr() - base) % ALIGN_BYTES == 0


def test_mixed_dtypes_share_one_copy():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(-9, 9, size=3).astype(np.int32), rng.integers(-9, 9, size=5),
              rng.integers(0, 50, size=(2, 3)).astype(np.int32), np.zeros(0, np.int64), rng.random(3)]
    out = upload_arrays(arrays, "cpu")
    base = out[0].data_ptr()
    for host, view in zip(arrays, out, strict=True):
        assert view.dtype == torch.from_numpy(host).dtype and view.shape == host.shape
        assert torch.equal(view, torch.from_numpy(host))
        assert (view.data_ptr() - base) % ALIGN_BYTES == 0
