"""LoRA-Switch switch/merge kernel vs its jnp reference and a float64 loop oracle.

Every case runs twice: `TestSwitchMergeGPU` compiled on a GPU (`pytest -m gpu` with
JAX_PLATFORMS=cuda; skipped elsewhere, fp32 dots at HIGHEST precision, see
test_kernel_lora_unmerged.py) and `TestSwitchMergeInterpret` in Pallas interpret mode on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import switch_merge as sm

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# (L, E, r, out, in, k): dims not multiples of the blocks, k = 1, 2, 4, E = 2..16, r = 4..64
CASES = [
    (2, 2, 4, 200, 72, 1),
    (3, 5, 16, 200, 72, 2),
    (1, 16, 64, 40, 136, 4),
    (2, 8, 8, 96, 48, 2),
]


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def make_bank(seed, n_layers, n_exp, rank, out, d_in, dtype):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_layers, out, d_in))
    a = rng.standard_normal((n_layers, n_exp, rank, d_in)) / np.sqrt(d_in)
    b = rng.standard_normal((n_layers, n_exp, out, rank)) / np.sqrt(rank)
    return tuple(jnp.asarray(t, dtype) for t in (w, a, b))


def pick(rng, n_exp, k, routing="uniform"):
    """k distinct experts (uniform or zipf-popular) and renormalised gates."""
    if routing == "zipf":
        p = 1.0 / np.arange(1, n_exp + 1) ** 1.2
        e = rng.choice(n_exp, size=k, replace=False, p=p / p.sum())
    else:
        e = rng.choice(n_exp, size=k, replace=False)
    g = rng.random(k) + 0.1
    return jnp.asarray(e, jnp.int32), jnp.asarray(g / g.sum(), jnp.float32)


def merge_f64(w, a, b, terms):
    """W[l] + sum over (ids, gates, sign) terms of sign * g * B[l, e] @ A[l, e], float64 loops."""
    w, a, b = (np.asarray(t, np.float64) for t in (w, a, b))
    out = w.copy()
    for layer in range(w.shape[0]):
        for ids, gates, sign in terms:
            for e, g in zip(np.asarray(ids), np.asarray(gates, np.float64), strict=True):
                out[layer] += sign * g * (b[layer, e] @ a[layer, e])
    return out


class _SwitchMergeCases:
    """The cases; collected through the GPU and interpret subclasses below."""

    INTERPRET: bool

    def switch(self, *args, **kw):
        return sm.switch_merge(*args, impl="pallas", interpret=self.INTERPRET, **kw)

    def from_base(self, *args, **kw):
        return sm.merge_from_base(*args, impl="pallas", interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("steps", [None, 1, 2])  # whole row per program, 1 tile, uneven
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("case", CASES)
    def test_switch_matches_reference_and_f64(self, case, dtype, steps):
        n_layers, n_exp, rank, out, d_in, k = case
        w, a, b = make_bank(0, n_layers, n_exp, rank, out, d_in, dtype)
        rng = np.random.default_rng(1)
        routing = "zipf" if n_exp > 4 else "uniform"
        e_old, g_old = pick(rng, n_exp, k, routing)
        e_new, g_new = pick(rng, n_exp, k, routing)
        got = self.switch(
            w,
            a,
            b,
            e_old,
            g_old,
            e_new,
            g_new,
            block_sizes=dict(block_out=64, block_in=32, steps=steps),
        )
        ref = sm.switch_merge(w, a, b, e_old, g_old, e_new, g_new, impl="reference")
        f64 = merge_f64(w, a, b, [(e_old, g_old, -1.0), (e_new, g_new, 1.0)])
        assert got.dtype == w.dtype and got.shape == w.shape
        assert rel_err(got, ref) < TOL[dtype]
        assert rel_err(got, f64) < TOL[dtype]
        # the switch must actually have changed W (the delta is not lost in rounding)
        assert rel_err(w, f64) > 10 * rel_err(got, f64)

    def test_repeated_and_kept_experts(self):
        """Duplicate slots add up; an expert kept with the same gate contributes nothing."""
        w, a, b = make_bank(2, 2, 6, 8, 72, 40, jnp.float32)
        e_old, g_old = jnp.array([1, 4], jnp.int32), jnp.array([0.25, 0.75], jnp.float32)
        e_new, g_new = jnp.array([3, 3, 4], jnp.int32), jnp.array([0.1, 0.15, 0.75], jnp.float32)
        got = self.switch(w, a, b, e_old, g_old, e_new[:2], g_new[:2])
        f64 = merge_f64(w, a, b, [(e_old, g_old, -1.0), (e_new[:2], g_new[:2], 1.0)])
        assert rel_err(got, f64) < 1e-5
        got3 = sm.merge_delta_pallas(
            w,
            a,
            b,
            jnp.concatenate([e_old, e_new]),
            jnp.concatenate([-g_old, g_new]),
            interpret=self.INTERPRET,
        )
        f64_3 = merge_f64(w, a, b, [(e_old, g_old, -1.0), (e_new, g_new, 1.0)])
        assert rel_err(got3, f64_3) < 1e-5

    def test_in_place_with_donation(self):
        w, a, b = make_bank(3, 2, 4, 16, 200, 72, jnp.float32)
        e_old, g_old = jnp.array([0, 1], jnp.int32), jnp.array([0.5, 0.5], jnp.float32)
        e_new, g_new = jnp.array([2, 3], jnp.int32), jnp.array([0.3, 0.7], jnp.float32)
        ref = sm.switch_merge(w, a, b, e_old, g_old, e_new, g_new, impl="reference")
        step = jax.jit(functools.partial(self.switch), donate_argnums=0)
        w_donated = jnp.array(w)
        got = step(w_donated, a, b, e_old, g_old, e_new, g_new)
        assert rel_err(got, ref) < 1e-5
        assert w_donated.is_deleted()  # the buffer was handed to the kernel's aliased output

    def test_noop_when_selection_unchanged(self):
        w, a, b = make_bank(4, 2, 4, 16, 200, 72, jnp.bfloat16)
        e, g = jnp.array([2, 0], jnp.int32), jnp.array([0.6, 0.4], jnp.float32)
        same = self.switch(w, a, b, e, g, e, g)
        np.testing.assert_array_equal(np.asarray(same), np.asarray(w))  # bit-exact
        changed = self.switch(w, a, b, e, g, e, g.at[0].add(0.1))
        assert rel_err(changed, w) > 1e-3

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_merge_from_base(self, dtype):
        w, a, b = make_bank(5, 3, 7, 32, 200, 72, dtype)
        e, g = pick(np.random.default_rng(6), 7, 4, "zipf")
        got = self.from_base(w, a, b, e, g)
        assert rel_err(got, sm.merge_from_base(w, a, b, e, g, impl="reference")) < TOL[dtype]
        assert rel_err(got, merge_f64(w, a, b, [(e, g, 1.0)])) < TOL[dtype]

    def test_bf16_drift_bounded_by_remerge(self):
        """50 in-place bf16 switches drift from a fresh merge; re-merging every 10 bounds it."""
        n_switches, every = 50, 10
        w_base, a, b = make_bank(7, 2, 8, 16, 64, 64, jnp.bfloat16)
        rng = np.random.default_rng(8)
        sels = [pick(rng, 8, 2) for _ in range(n_switches + 1)]
        kw = dict(impl="pallas", interpret=self.INTERPRET)
        switch = jax.jit(functools.partial(sm.switch_merge, **kw), donate_argnums=0)
        policy = jax.jit(
            functools.partial(sm.switch_merge_with_remerge, remerge_every=every, **kw),
            donate_argnums=0,
        )
        w_chain = sm.merge_from_base(w_base, a, b, *sels[0], **kw)
        w_pol, count = jnp.array(w_chain), jnp.int32(0)
        drift_chain, drift_pol = [], []
        for (e_old, g_old), (e_new, g_new) in zip(sels[:-1], sels[1:], strict=True):
            w_chain = switch(w_chain, a, b, e_old, g_old, e_new, g_new)
            w_pol, count = policy(w_pol, w_base, a, b, e_old, g_old, e_new, g_new, count)
            exact = merge_f64(w_base, a, b, [(e_new, g_new, 1.0)])
            drift_chain.append(rel_err(w_chain, exact))
            drift_pol.append(rel_err(w_pol, exact))
        one_rounding = 2.0**-9  # bf16 relative rounding step
        # in-place switching accumulates roundings (random walk: ~sqrt(n) of them) ...
        assert drift_chain[-1] > 2 * drift_chain[0]
        assert drift_chain[-1] < np.sqrt(n_switches) * one_rounding
        # ... the policy resets it every `every` switches and never exceeds sqrt(every) of them
        assert max(drift_pol) < np.sqrt(every) * one_rounding
        assert drift_pol[every - 1] <= drift_chain[0] * 1.01  # right after a fresh merge
        assert max(drift_pol) < drift_chain[-1]


@pytest.mark.gpu
class TestSwitchMergeGPU(_SwitchMergeCases):
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _on_gpu_at_highest(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU: JAX_PLATFORMS=cuda pytest -m gpu")
        with jax.default_matmul_precision("highest"):  # fp32 dots as IEEE fp32, not TF32
            yield


class TestSwitchMergeInterpret(_SwitchMergeCases):
    INTERPRET = True


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_uses_reference_off_gpu():
    w, a, b = make_bank(9, 1, 3, 4, 24, 20, jnp.float32)
    e, g = jnp.array([1], jnp.int32), jnp.array([1.0], jnp.float32)
    got = sm.merge_from_base(w, a, b, e, g)  # impl="auto"
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(sm.merge_delta_reference(w, a, b, e, g))
    )


def test_shape_errors():
    w, a, b = make_bank(10, 2, 3, 4, 24, 20, jnp.float32)
    e, g = jnp.array([1], jnp.int32), jnp.array([1.0], jnp.float32)
    with pytest.raises(ValueError, match="a.shape"):
        sm.merge_from_base(w, a[:, :, :, :-1], b, e, g, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="ids.shape"):
        sm.merge_from_base(w, a, b, e, g[:0], impl="reference")
    with pytest.raises(ValueError, match="remerge_every"):
        sm.switch_merge_with_remerge(w, w, a, b, e, g, e, g, 0, remerge_every=0)


def test_block_size_clamps():
    assert sm.block_size(64, 200) == 64
    assert sm.block_size(64, 20) == 32
    assert sm.block_size(64, 3) == 16  # Triton's dot needs >= 16
    assert sm.block_size(48, 1000) == 64  # powers of two only
