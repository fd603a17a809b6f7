"""Per-token buffers that grow along the sequence: the storage of every cache in hsr."""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The overload itself: called through torch.ops.hsr.decode_dense_step, a cold decode step
# spends microseconds more in the overload packet's Python.
_DECODE_DENSE_STEP = torch.ops.hsr.decode_dense_step.default


class TokenBuffers:
    """(B, heads, length, width) tensors that grow together along length (by doubling, so
    appends cost amortised O(1); the first fill gets an eighth more room, so the steps right
    after a prefill copy nothing); subclasses name them in ``_names``, one name per (heads,
    width) in ``shapes``."""

    _names: tuple = ()

    def __init__(self, batch: int, shapes, dtype, device, dtypes=None):
        """dtypes: one dtype per buffer when they differ (internal buffers such as a key
        sketch); `dtype` (float32, float16 or bfloat16) for all otherwise."""
        cls = type(self).__name__
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{cls}: batch must be a positive integer, got {batch!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"{cls}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.batch, self.dtype, self.device = batch, dtype, torch.device(device)
        if len(shapes) != len(self._names):
            raise ValueError(f"{cls}: one (heads, width) per buffer {self._names}, got {shapes}")
        self._shapes = shapes
        self._name_list = list(self._names)
        self._dtypes = tuple(dtypes) if dtypes is not None else (dtype,) * len(shapes)
        self._bufs = [torch.empty(batch, h, 0, w, dtype=t, device=self.device)
                      for (h, w), t in zip(shapes, self._dtypes)]
        # _capacity: the tokens the buffers have room for, kept as an int so that a decode step
        # reads it without a tensor call.
        self._length, self._capacity = 0, 0

    @property
    def length(self) -> int:
        return self._length

    def views(self):
        """What is held: one (B, heads, length, width) view per buffer."""
        return tuple(b.narrow(2, 0, self._length) for b in self._bufs)

    def view(self, name: str) -> torch.Tensor:
        """What one buffer holds, (B, heads, length, width) (a view), by its name in _names."""
        return self._held(self._names.index(name))

    def _held(self, i: int) -> torch.Tensor:
        # narrow is one tensor op; b[:, :, :n] goes through Python indexing (three slices),
        # several microseconds per call on a decode step's path.
        return self._bufs[i].narrow(2, 0, self._length)

    def append_tokens(self, *tensors, what: str | None = None, length: int = -1, finite: bool = False) -> None:
        """Appends one (B, heads, L, width) tensor per buffer; validated first (one L for all,
        equal to `length` when it is >= 0; with `finite`, no NaN or Inf), so bad input raises
        ValueError naming `what` (default "<class>.append") and leaves the buffers unchanged."""
        what = what or f"{type(self).__name__}.append"
        if len(tensors) != len(self._bufs):
            raise ValueError(f"{what}: one tensor per buffer {self._names}, got {len(tensors)}")
        tokens = list(tensors)
        self._check_tensors(tokens, what)
        first = tokens[0]
        need = self._length + (first.shape[2] if first.dim() == 4 else 0)
        checked = self._make_room(tokens, need, what, length, finite)
        # One call checks the tokens (the same checks; values once) and copies them in as rows.
        torch.ops.hsr.write_tokens(self._bufs, tokens, self._length, what, self._name_list, length,
                                   finite and not checked)
        self._length = need

    def _check_tensors(self, tokens: list, what: str) -> None:
        for name, t in zip(self._names, tokens):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{what}: {name} must be a tensor, got {type(t).__name__}")

    def _make_room(self, tokens: list, need: int, what: str, length: int, finite: bool) -> bool:
        """Grows the buffers to hold `need` tokens when they cannot, after checking the tokens
        (they are not checked otherwise: the write checks them); returns whether they were
        checked."""
        if need <= self._capacity:
            return False
        torch.ops.hsr.check_tokens(self._bufs, tokens, what, self._name_list, length, finite)
        self._grow(need)
        return True

    def _grow(self, need: int) -> None:
        old_cap = self._capacity
        cap = max(need + (need // 8 if old_cap == 0 else 0), 2 * old_cap, 64)
        grown = []
        for old, (h, w), dtype in zip(self._bufs, self._shapes, self._dtypes):
            new = torch.empty(self.batch, h, cap, w, dtype=dtype, device=self.device)
            new[:, :, :self._length] = old[:, :, :self._length]
            grown.append(new)
        self._bufs, self._capacity = grown, cap

    def permute_tokens(self, perm: torch.Tensor) -> None:
        """Reorders the first perm.shape[2] tokens of every buffer: token j becomes old token
        perm[b, h, j] (perm: (B, heads, n) int64, a permutation of 0..n-1 per (b, h); every
        buffer must have those heads). Whole rows, in parallel threads (hsr.permute_rows)."""
        torch.ops.hsr.permute_rows(self._bufs, perm)

    def elements_per_token(self) -> int:
        """Elements one token adds, all heads of the batch together."""
        return self.batch * sum(h * w for h, w in self._shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of what is held (not of the spare capacity)."""
        return self._length * self.batch * sum(h * w * t.itemsize for (h, w), t in zip(self._shapes, self._dtypes))

    def reset(self) -> None:
        self._length = 0



class KVCache(TokenBuffers):
    """One attention layer's keys (B, Hkv, L, D) and values (B, Hkv, L, value_dim; D by
    default): the cache of hsr.gta.GQAAttention and the storage of hsr.HSRKVCache."""

    _names = ("k", "v")

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, value_dim: int | None = None,
                 dtype=torch.float32, device="cpu"):
        value_dim = head_dim if value_dim is None else value_dim
        super().__init__(batch, ((num_kv_heads, head_dim), (num_kv_heads, value_dim)), dtype, device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.append_tokens(k, v)

    def append_and_attend(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, what: str, kind: str,
                          scale: float | None, alpha: int = 1, bias: float = 0.0, normalize: bool = True):
        """Appends one token (k, v: (B, Hkv, 1, width), checked finite) and attends q (B, Hq, 1,
        D) to every token held, in one call (hsr::decode_dense_step; attention's kind, scale,
        alpha, bias, normalize): (out, mass_bound, error_bound, keys_attended, keys_read) as a
        dense decode step reports them. Bad input raises ValueError naming `what` and leaves
        the buffers unchanged."""
        tokens, checked = [k, v], self._length == self._capacity
        if checked:
            self._check_tensors(tokens, what)
            self._make_room(tokens, self._length + 1, what, 1, True)
        try:
            result = _DECODE_DENSE_STEP(self._bufs, tokens, self._length, what, self._name_list, not checked, q, kind,
                                        scale, alpha, bias, normalize)
        except RuntimeError:  # the dispatcher's message for an argument that is not a tensor
            self._check_tensors(tokens, what)
            raise
        self._length += 1
        return result

    @property
    def keys(self) -> torch.Tensor:
        return self._held(0)

    @property
    def values(self) -> torch.Tensor:
        return self._held(1)
