"""Per-token buffers that grow along the sequence: the storage of every cache in hsr."""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        self._dtypes = tuple(dtypes) if dtypes is not None else (dtype,) * len(shapes)
        self._bufs = [torch.empty(batch, h, 0, w, dtype=t, device=self.device)
                      for (h, w), t in zip(shapes, self._dtypes)]
        self._length = 0

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

    def append_tokens(self, *tensors) -> None:
        """Appends one (B, heads, L, width) tensor per buffer; validated first, so bad
        input raises and leaves the buffers unchanged."""
        cls = type(self).__name__
        n = None
        for name, t, (h, w), dtype in zip(self._names, tensors, self._shapes, self._dtypes):
            want = (self.batch, h, w)
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{cls}.append: {name} must be ({self.batch}, {h}, L, {w}), got {got}")
            if t.dtype != dtype or t.device != self.device:
                raise ValueError(f"{cls}.append: {name} must be {dtype} on {self.device}, got {t.dtype} on "
                                 f"{t.device}")
            if n is not None and t.shape[2] != n:
                raise ValueError(f"{cls}.append: {self._names[0]} and {name} must hold the same number of tokens")
            n = t.shape[2]
        need = self._length + n
        if need > self._bufs[0].shape[2]:
            old_cap = self._bufs[0].shape[2]
            cap = max(need + (need // 8 if old_cap == 0 else 0), 2 * old_cap, 64)
            grown = []
            for old, (h, w), dtype in zip(self._bufs, self._shapes, self._dtypes):
                new = torch.empty(self.batch, h, cap, w, dtype=dtype, device=self.device)
                new[:, :, :self._length] = old[:, :, :self._length]
                grown.append(new)
            self._bufs = grown
        if self.device.type == "cpu":
            torch.ops.hsr.write_tokens(self._bufs, list(tensors), self._length)
        else:
            for buf, t in zip(self._bufs, tensors):
                buf.narrow(2, self._length, n).copy_(t)
        self._length = need

    def permute_tokens(self, perm: torch.Tensor) -> None:
        """Reorders the first perm.shape[2] tokens of every buffer: token j becomes old token
        perm[b, h, j] (perm: (B, heads, n) int64, a permutation of 0..n-1 per (b, h); every
        buffer must have those heads)."""
        n = perm.shape[2]
        for buf in self._bufs:
            part = buf[:, :, :n]
            part.copy_(part.gather(2, perm.unsqueeze(-1).expand(-1, -1, -1, buf.shape[3])))

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

    @property
    def keys(self) -> torch.Tensor:
        return self._held(0)

    @property
    def values(self) -> torch.Tensor:
        return self._held(1)
