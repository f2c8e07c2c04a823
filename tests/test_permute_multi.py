"""pyrebasin::permute_multi: native == reference bit-for-bit, opcheck, and caller errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrebasin import ops, reference
from pyrebasin._backend import has_kernel, use_backend

native = pytest.mark.skipif(not has_kernel("permute_multi", "cpu"), reason="native CPU kernel not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]


def _random_tensor(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def sample_inputs(seed: int, n_tensors: int = 4, max_dim: int = 4, max_size: int = 7, noncontig=True):
    g = torch.Generator().manual_seed(seed)
    tensors, indices, owners, axes = [], [], [], []
    for t in range(n_tensors):
        ndim = int(torch.randint(0, max_dim + 1, (1,), generator=g))
        shape = [int(torch.randint(1, max_size + 1, (1,), generator=g)) for _ in range(ndim)]
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=g))]
        x = _random_tensor(shape, dtype, g)
        if noncontig and ndim >= 2 and bool(torch.rand(1, generator=g) < 0.5):
            x = x.transpose(0, -1)  # strides reversed
        elif noncontig and ndim >= 1 and bool(torch.rand(1, generator=g) < 0.3):
            x = _random_tensor([*shape[:-1], 2 * shape[-1]], dtype, g)[..., ::2]  # strided last axis
        tensors.append(x)
        for axis in range(x.dim()):
            if bool(torch.rand(1, generator=g) < 0.6):
                indices.append(torch.randperm(x.shape[axis], generator=g))
                owners.append(t)
                axes.append(axis if bool(torch.rand(1, generator=g) < 0.5) else axis - x.dim())
    return tensors, indices, owners, axes


def _assert_bitwise(out, ref):
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert o.is_contiguous()
        # Compare raw bytes: bit-for-bit (NaN payloads and -0.0 included).
        assert torch.equal(o.reshape(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8))


@native
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_tensors=st.integers(1, 6))
def test_native_matches_reference_bitwise(seed, n_tensors):
    args = sample_inputs(seed, n_tensors)
    with use_backend("native"):
        out = ops.permute_multi(*args)
    _assert_bitwise(out, reference.permute_multi(*args))


@native
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_large_tensor(dtype):
    g = torch.Generator().manual_seed(1)
    x = _random_tensor([513, 257], dtype, g)[:, 1:]  # odd sizes, non-contiguous rows
    idx = [torch.randperm(513, generator=g), torch.randperm(256, generator=g)]
    out = torch.ops.pyrebasin.permute_multi([x], idx, [0, 0], [0, 1])
    _assert_bitwise(out, [x.index_select(0, idx[0]).index_select(1, idx[1])])


@native
def test_scalars_empty_and_unpermuted_tensors_are_copied():
    xs = [torch.tensor(3.5), torch.empty(0, 4), torch.arange(6.0).view(2, 3)]
    out = torch.ops.pyrebasin.permute_multi(xs, [], [], [])
    for o, x in zip(out, xs):
        assert torch.equal(o, x) and (o.numel() == 0 or o.data_ptr() != x.data_ptr())


@native
def test_input_untouched():
    x = torch.randn(5, 6)
    before = x.clone()
    torch.ops.pyrebasin.permute_multi([x], [torch.randperm(5)], [0], [0])
    assert torch.equal(x, before)


@native
@pytest.mark.parametrize("seed", range(4))
def test_opcheck(seed):
    tensors, indices, owners, axes = sample_inputs(seed, noncontig=False)
    torch.library.opcheck(torch.ops.pyrebasin.permute_multi.default, (tensors, indices, owners, axes),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@native
@pytest.mark.parametrize("bad, match", [
    (lambda x: ([x], [torch.arange(3)], [0], [0]), r"indices\[0\] must have shape \[4\]"),
    (lambda x: ([x], [torch.tensor([0, 1, 2, 9])], [0], [0]), r"outside \[0, 4\)"),
    (lambda x: ([x], [torch.tensor([0, 1, 2, -1])], [0], [0]), r"outside \[0, 4\)"),
    (lambda x: ([x], [torch.arange(4, dtype=torch.int32)], [0], [0]), "must be int64"),
    (lambda x: ([x], [torch.arange(4), torch.arange(4)], [0, 0], [0, 0]), "permuted twice"),
    (lambda x: ([x], [torch.arange(4)], [1], [0]), r"owners\[0\] = 1 is out of range"),
    (lambda x: ([x], [torch.arange(4)], [0], [5]), r"axes\[0\] = 5 is out of range"),
    (lambda x: ([x], [torch.arange(4)], [0, 0], [0]), "same length"),
])
def test_caller_errors_name_the_argument(bad, match):
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pyrebasin.permute_multi(*bad(x))


@native
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float64, torch.complex128])
def test_every_block_size_of_gathered_rows(dtype):
    # [O, I, k]: rows of I blocks of k contiguous elements; blocks of 1..70 elements cover every
    # size class of the small-block copy (1 to 16 bytes up to > 64 bytes), contiguous and strided.
    g = torch.Generator().manual_seed(2)
    tensors, indices, owners, axes = [], [], [], []
    for k in range(1, 71):
        x = _random_tensor([3, 5, k], dtype, g)
        if k % 3 == 0:
            x = _random_tensor([3, 7, k], dtype, g)[:, ::2]  # blocks at a stride: no coalescing
        tensors.append(x)
        indices += [torch.randperm(3, generator=g), torch.randperm(x.shape[1], generator=g)]
        owners += [k - 1, k - 1]
        axes += [0, 1]
    out = torch.ops.pyrebasin.permute_multi(tensors, indices, owners, axes)
    _assert_bitwise(out, reference.permute_multi(tensors, indices, owners, axes))


@native
def test_shared_index_and_two_threads_split_by_bytes():
    # One index tensor reused on many axes (checked once), a large matrix next to many small
    # tensors (the byte split between threads), and an output big enough for huge-page advice.
    g = torch.Generator().manual_seed(3)
    p = torch.randperm(1100, generator=g)
    tensors = [torch.randn(1100, 1100, generator=g)] + [torch.randn(1100, generator=g) for _ in range(40)]
    tensors.append(torch.randn(1100, 16, 3, generator=g))
    indices = [p, p] + [p] * 41
    owners = [0, 0, *range(1, 42)]
    axes = [0, 1] + [0] * 41
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.ops.pyrebasin.permute_multi(tensors, indices, owners, axes)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(out, reference.permute_multi(tensors, indices, owners, axes))
    bad = torch.cat([p[:-1], torch.tensor([1100])])
    with pytest.raises(RuntimeError, match=r"outside \[0, 1100\)"):
        torch.ops.pyrebasin.permute_multi(tensors[1:3], [bad, bad], [0, 1], [0, 0])


@native
@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (2900, 2901)), (torch.float32, (2049, 2051)),
                                          (torch.float64, (1450, 1451)), (torch.int8, (4100, 4099))])
def test_outputs_past_the_streaming_threshold(dtype, shape):
    # >= 16 MiB with a permuted last dim: non-temporal stores; odd rows start both 16-byte aligned
    # and not, and end in a tail shorter than a line.
    g = torch.Generator().manual_seed(4)
    x = _random_tensor(shape, dtype, g)
    idx = [torch.randperm(shape[0], generator=g), torch.randperm(shape[1], generator=g)]
    out = torch.ops.pyrebasin.permute_multi([x], idx, [0, 0], [0, 1])
    _assert_bitwise(out, [x.index_select(0, idx[0]).index_select(1, idx[1])])


@native
@pytest.mark.parametrize("rank", range(10))
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_every_rank_fixed_or_permuted_matches_reference(rank, layout):
    # Regression: a 9-D fixed buffer (no permuted axis) was refused by the native op ("at most 8
    # dims") while the reference copied it. Ranks 0..9, with no permuted axis, one, and every axis
    # (up to 9 permuted axes: more than one pass can hold, gathered in stages).
    g = torch.Generator().manual_seed(rank)
    shape = [(2, 3, 1)[a % 3] for a in range(rank)]
    x = torch.randn(shape, generator=g)
    if layout == "transposed" and rank >= 2:
        x = x.transpose(0, -1)
    elif layout == "strided" and rank >= 1:
        x = torch.randn([*shape[:-1], 2 * shape[-1]], generator=g)[..., ::2]
    choices = [[]] + ([[rank - 1], list(range(rank))] if rank else [])
    for axes in choices:
        indices = [torch.randperm(x.shape[a], generator=g) for a in axes]
        args = ([x, torch.randn(3, generator=g)], indices, [0] * len(axes), axes)
        with use_backend("native"):
            out = ops.permute_multi(*args)
        _assert_bitwise(out, reference.permute_multi(*args))
        assert out[0].data_ptr() != x.data_ptr() or x.numel() == 0


@native
def test_fake_kernels_quote_what_they_got():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 5)
        with pytest.raises(RuntimeError, match=r"indices\[0\] must have shape \[4\] .*got \[3\]"):
            torch.ops.pyrebasin.permute_multi([x], [torch.arange(3)], [0], [0])
        with pytest.raises(RuntimeError, match="must be int64, got torch.int32"):
            torch.ops.pyrebasin.permute_multi([x], [torch.arange(4, dtype=torch.int32)], [0], [0])
        with pytest.raises(RuntimeError, match=r"axes\[0\] = 5 is out of range .*shape \[4, 5\]"):
            torch.ops.pyrebasin.permute_multi([x], [torch.arange(4)], [0], [5])
        with pytest.raises(RuntimeError, match="permuted twice"):
            torch.ops.pyrebasin.permute_multi([x], [torch.arange(4)] * 2, [0, 0], [0, -2])
