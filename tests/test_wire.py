"""The npy wire format (ppoison_ext.client.wire): what np.save writes reads back through the header
fast path exactly as np.load reads it; anything else goes through np.load; bad bodies are WireErrors."""

import io

import numpy as np
import pytest

from ppoison_ext.client.wire import _PLAIN_HEADER, WireError, decode_npy, encode_npy

CASES = [np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32),
         np.zeros((0, 1, 28, 28), np.float32), np.arange(5.0), np.array(3.0, np.float32),
         np.ones((2, 3), bool), np.arange(6, dtype=np.uint8).reshape(2, 3),
         np.asfortranarray(np.random.default_rng(1).random((3, 4))), np.arange(4, dtype=">f4").reshape(2, 2),
         np.arange(3, dtype=np.int64)]


def _saved(a, version=None):
    buf = io.BytesIO()
    if version is None:
        np.save(buf, a, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, a, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype.str}{list(a.shape)}")
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_decode_equals_np_load(a, version):
    data = _saved(a, version)
    want = np.load(io.BytesIO(data), allow_pickle=False)
    got = decode_npy(data)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable
    plain = version is None and a.dtype.str[0] in "<|" and (a.flags.c_contiguous or a.ndim < 2)
    assert bool(_PLAIN_HEADER.match(data)) == plain  # the fast path covers exactly np.save's plain arrays


def test_encode_round_trips_and_bad_bodies_are_wire_errors():
    x = np.random.default_rng(2).random((2, 1, 4, 4), dtype=np.float32)
    assert np.array_equal(decode_npy(encode_npy(x)), x)
    data = encode_npy(x)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (data[:-1], data[:20], b"not npy", b"\x93NUMPY", pickled.getvalue()):
        with pytest.raises(WireError):
            decode_npy(bad)
    lying = data.replace(b"'shape': (2, 1, 4, 4)", b"'shape': (3, 1, 4, 4)")  # more rows than the data holds
    with pytest.raises(WireError):
        decode_npy(lying)
