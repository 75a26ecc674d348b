"""The fused Triton kernel against the float64 reference, run on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, set in conftest.py before triton is imported). Tests that need
a GPU (bf16, large shapes, bitwise determinism) are marked `cuda` and skipped without one."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from loss_reference import assert_close_to_reference, make_batch, rel_err

from recsys_ccl import contrastive_loss
from recsys_ccl.contrastive_torch import contrastive_loss_naive
from recsys_ccl.kernels.contrastive_function import triton_contrastive_loss
from recsys_ccl.kernels.launch_plan import launch_plan, resolve_precision

# Small blocks so that odd shapes span several row and column tiles with ragged tails.
BLOCKS = (16, 32)


def triton_fn(dtype=torch.float32, blocks=BLOCKS):
    def fn(u, v, t, lq, ids, symmetric, reduction):
        return triton_contrastive_loss(u.to(dtype), v.to(dtype), t, lq, ids, symmetric,
                                       reduction, precision="ieee", blocks=blocks)
    return fn


class _Counted:
    """A @triton.jit kernel whose launches (kernel[grid](...)) are counted."""

    def __init__(self, kernel, name: str, counts: Counter):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches during a test, so a silent fallback cannot pass."""
    from recsys_ccl.kernels import contrastive_backward, contrastive_forward

    counts: Counter = Counter()
    for module, attr, name in ((contrastive_forward, "_row_lse_kernel", "row_lse"),
                               (contrastive_forward, "_col_lse_kernel", "col_lse"),
                               (contrastive_backward, "_grad_user_kernel", "grad_user"),
                               (contrastive_backward, "_grad_item_kernel", "grad_item")):
        monkeypatch.setattr(module, attr, _Counted(getattr(module, attr), name, counts))
    return lambda: dict(counts)


@pytest.mark.parametrize(("B", "N", "D"), [(37, 37, 16), (37, 101, 48), (37, 101, 123)])
@pytest.mark.parametrize(("symmetric", "reduction"),
                         [(False, "mean"), (False, "sum"), (False, "none"), (True, "mean"),
                          (True, "none")])
@pytest.mark.parametrize(("log_q", "dup_ids"), [(False, False), (True, True)])
def test_fp32_matches_float64_reference(B, N, D, symmetric, reduction, log_q, dup_ids,
                                        launches):
    user, item, lq, ids = make_batch(B, N, D, log_q=log_q, dup_ids=dup_ids, seed=B + N + D)
    assert_close_to_reference(triton_fn(), user, item, 0.07, lq, ids, symmetric, reduction,
                              tol=2e-5)
    ran = launches()
    assert ran["row_lse"] == 1 and ran["grad_user"] == 1 and ran["grad_item"] == 1
    assert ran.get("col_lse", 0) == int(symmetric)


@pytest.mark.parametrize(("symmetric", "reduction"), [(False, "mean"), (True, "none")])
def test_fp16_inputs(symmetric, reduction):
    """fp16 inputs, fp32 accumulation: at most 1e-3 from float64 on the fp16-rounded inputs."""
    user, item, lq, ids = make_batch(37, 101, 48, log_q=True, dup_ids=True, seed=7)
    user, item = user.half(), item.half()

    def fn(u, v, t, lq_, ids_, s, r):
        return triton_contrastive_loss(u, v, t, lq_, ids_, s, r, blocks=BLOCKS)

    assert_close_to_reference(fn, user, item, 0.1, lq, ids, symmetric, reduction, tol=1e-3)


def test_public_function_runs_the_kernel(launches):
    user, item, lq, ids = make_batch(37, 101, 48, log_q=True, dup_ids=True)
    u = user.clone().requires_grad_()
    loss = contrastive_loss(u, item, 0.1, lq, ids, symmetric=True, impl="triton")
    loss.backward()
    assert launches() == {"row_lse": 1, "col_lse": 1, "grad_user": 1}  # item needs no grad
    ref = contrastive_loss(user, item, 0.1, lq, ids, symmetric=True, impl="naive")
    assert rel_err(loss.detach(), ref) < 2e-5


def test_default_block_sizes(launches):
    """The launcher's own (heuristic) block sizes, not only the small test blocks."""
    user, item, lq, ids = make_batch(37, 101, 48, log_q=True, dup_ids=True, seed=2)
    assert_close_to_reference(triton_fn(blocks=None), user, item, 0.1, lq, ids, True, "mean",
                              tol=2e-5)
    assert launches()["row_lse"] == 1


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 40), extra=st.integers(0, 40), D=st.integers(2, 70),
       symmetric=st.booleans(), log_q=st.booleans(), dup_ids=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 10_000))
def test_any_shape(B, extra, D, symmetric, log_q, dup_ids, reduction, seed):
    user, item, lq, ids = make_batch(B, B + extra, D, log_q=log_q, dup_ids=dup_ids, seed=seed)
    assert_close_to_reference(triton_fn(), user, item, 0.2, lq, ids, symmetric, reduction,
                              tol=2e-5, plus_torch_error=True)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_negative_masked_gives_exactly_zero(precision, symmetric, launches):
    """The positive logit comes from the same tile as the softmax's max, so a row left with
    only its positive has loss 0 and gradient 0 exactly (not a rounding residue whose
    expm1(-loss) would flip the diagonal gradient's sign)."""
    user, item, _, _ = make_batch(19, 40, 16, seed=3)
    ids = torch.full((40,), 3)
    u, v = user.clone().requires_grad_(), item.clone().requires_grad_()
    t = torch.tensor(0.1, requires_grad=True)
    loss = triton_contrastive_loss(u, v, t, None, ids, symmetric, "none", precision,
                                   blocks=BLOCKS)
    assert torch.equal(loss, torch.zeros(19))
    loss.sum().backward()
    assert torch.equal(u.grad, torch.zeros_like(u)) and torch.equal(v.grad, torch.zeros_like(v))
    assert float(t.grad) == 0.0
    assert launches()["grad_item"] == 1


def test_fp16_gradients_do_not_underflow():
    """fp16 at B = N = 4096, τ = 0.5 (a flat softmax): dS = p · g with g = 1/B and p ~ 1/N
    sits at fp16's smallest subnormal (6e-8). Scaled by a power of two before the cast, dU and
    dV stay within 1e-2 of float64; rounded unscaled, dV is off by about 2e-2."""
    user, item, lq, _ = make_batch(4096, 4096, 32, log_q=True, seed=11)
    user, item = user.half(), item.half()
    u64, v64 = user.double().requires_grad_(), item.double().requires_grad_()
    contrastive_loss_naive(u64, v64, 0.5, lq.double(), None, False, "mean").backward()
    u, v = user.clone().requires_grad_(), item.clone().requires_grad_()
    triton_contrastive_loss(u, v, torch.tensor(0.5), lq, None, False, "mean",
                            blocks=(128, 128)).backward()
    assert rel_err(u.grad, u64.grad) <= 1e-2
    assert rel_err(v.grad, v64.grad) <= 1e-2


def test_temperature_gradient_accumulates_in_fp32():
    user, item, lq, ids = make_batch(97, 211, 40, log_q=True, dup_ids=True, seed=5)
    errs = assert_close_to_reference(triton_fn(), user, item, 0.05, lq, ids, True, "mean",
                                     tol=2e-5)
    assert errs["d_tau"] <= 1e-4


def test_non_finite_input_is_refused_before_launch(launches):
    user, item, _, _ = make_batch(5, 12, 16)
    item[3, 0] = float("nan")
    with pytest.raises(ValueError, match="item_emb contains NaN or infinite"):
        contrastive_loss(user, item, impl="triton", check_inputs=True)
    assert launches() == {}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 5e-4), (torch.bfloat16, 1e-2)])
def test_cuda_large_shapes(dtype, tol):
    user, item, lq, ids = make_batch(4099, 8191, 128, log_q=True, dup_ids=True)
    user, item, lq, ids = user.cuda(), item.cuda(), lq.cuda(), ids.cuda()

    def fn(u, v, t, lq_, ids_, s, r):
        return contrastive_loss(u.to(dtype), v.to(dtype), t.cuda(), lq_, ids_, s, r,
                                impl="triton")

    assert_close_to_reference(fn, user, item, 0.05, lq, ids, True, "mean", tol=tol)


@pytest.mark.cuda
@cuda
def test_cuda_bitwise_deterministic():
    user, item, lq, ids = make_batch(3001, 6007, 96, log_q=True, dup_ids=True)
    results = []
    for _ in range(3):
        u = user.cuda().requires_grad_()
        v = item.cuda().requires_grad_()
        loss = contrastive_loss(u, v, 0.05, lq.cuda(), ids.cuda(), symmetric=True)
        loss.backward()
        results.append((loss.detach(), u.grad, v.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n_split", [2, 3, 5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_columns_split_across_programs(n_split, symmetric, launches):
    """Flash-decoding over N: each program of the row-direction kernels takes a tile-aligned
    range of columns, and the partial (max, sum, positive) and dU are combined in a fixed
    order: the float64 reference to 2e-5 and the unsplit kernel to rounding, with ranges that
    end mid-tile, hold the diagonal or nothing but padding."""
    user, item, lq, ids = make_batch(37, 141, 40, log_q=True, dup_ids=True, seed=n_split)

    def fn(u, v, t, lq_, ids_, s, r):
        return triton_contrastive_loss(u, v, t, lq_, ids_, s, r, "ieee", BLOCKS, n_split)

    split = assert_close_to_reference(fn, user, item, 0.07, lq, ids, symmetric, "mean",
                                      tol=2e-5)
    whole = assert_close_to_reference(triton_fn(), user, item, 0.07, lq, ids, symmetric,
                                      "mean", tol=2e-5)
    assert all(abs(split[k] - whole[k]) < 1e-5 for k in split)
    assert launches()["row_lse"] == 2


def test_gpu_plan_splits_columns_only_when_rows_cannot_fill_the_device():
    small = launch_plan(4096, 65536, 128, torch.bfloat16, interpreter=False, num_sms=132)
    large = launch_plan(262144, 262144, 128, torch.bfloat16, interpreter=False, num_sms=132)
    assert small.n_split > 1 and large.n_split == 1
    rows = -(-4096 // small.row_lse.block_b)
    assert rows * small.n_split >= 132  # at least one program per SM
    cols = small.columns_per_split(65536, small.row_lse.block_n)
    assert cols % small.row_lse.block_n == 0 and cols * small.n_split >= 65536


def test_launch_plan_refuses_what_the_kernel_cannot_run():
    with pytest.raises(ValueError, match=r"embedding sizes 1\.\.256, got D = 257"):
        launch_plan(8, 8, 257, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        launch_plan(8, 8, 64, torch.float64)
    user, item, _, _ = make_batch(5, 9, 300)
    with pytest.raises(ValueError, match="D = 300"):
        contrastive_loss(user, item, impl="triton")


def test_fp32_precision_follows_torch_setting():
    before = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert resolve_precision(torch.float32, None) == expected
            assert launch_plan(64, 64, 64, torch.float32, interpreter=False).precision == expected
            # an explicit request wins; 16-bit inputs are exact products whatever is asked
            assert resolve_precision(torch.float32, "ieee") == "ieee"
            assert resolve_precision(torch.bfloat16, None) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision(torch.float32, "fp64")


def test_gpu_plan_differs_from_the_interpreters():
    """The launcher's GPU plan is what the compile test checks; the interpreter's is only for
    CPU runs (assert which one a test gets, so a GPU run cannot silently use the other)."""
    gpu = launch_plan(4096, 8192, 64, torch.bfloat16, interpreter=False)
    cpu = launch_plan(4096, 8192, 64, torch.bfloat16, interpreter=True)
    assert gpu != cpu
    assert gpu.row_lse.num_stages > 1 and cpu.row_lse.num_stages == 1
