"""Per-array checksums of a checkpoint, computed on the devices where the arrays live.

A checksum is a 32-bit sum over an array's elements of a hash of (element bits, element index).
Integer addition modulo 2^32 is associative and commutative, so the sum does not depend on how
the array is split over devices or on the order XLA reduces it: a checkpoint written from one
mesh verifies when restored onto another. Hashing each element with its index makes moved or
swapped bytes count, not only changed ones; a random overwrite passes with probability 2^-32.

Cost: one fused elementwise pass and a reduction per array, on the devices, at each save and
each restore: a few operations per parameter, small next to a train step's thousands of FLOPs per
parameter, and the state never leaves the devices for it.
"""

import jax
import jax.numpy as jnp
import numpy as np

_INDEX_MIX = np.uint32(0x9E3779B9)  # golden-ratio increment: spreads neighbouring indices apart


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x):
    """The element bits of `x` as uint32, whatever its dtype (bool, 8/16/32-bit ints and floats)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize > 4:
        raise TypeError(f"checksums cover dtypes of at most 32 bits, not {x.dtype}")
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def array_checksum(x):
    """uint32 scalar: sum over elements of fmix32(bits + index * golden)."""
    bits = _bits(x).reshape(-1)
    index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    return jnp.sum(_fmix32(bits + index * _INDEX_MIX), dtype=jnp.uint32)


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@jax.jit
def _summary(tree):
    return jax.tree.map(array_checksum, tree), _all_finite(tree)


def keyed(tree) -> dict:
    """{'params/layers/attn/query/kernel': leaf, ...}: a pytree flattened to path strings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): leaf
        for path, leaf in leaves
    }


def checksums(tree) -> tuple[dict, bool]:
    """({path: checksum as int}, whether every float element is finite) of a pytree of arrays.
    Every process gets the same answer (the results are replicated scalars)."""
    sums, finite = jax.device_get(_summary(tree))
    return {path: int(v) for path, v in keyed(sums).items()}, bool(finite)


def mismatches(tree, expected: dict) -> list[str]:
    """Paths of the arrays in `tree` whose checksum differs from `expected` (or is missing there)."""
    found, _ = checksums(tree)
    return [path for path, value in found.items() if expected.get(path) != value]
