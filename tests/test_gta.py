"""GTA (hsr.gta, hsr.gta_attention) and the tiny LMs of hsr.models: configs and accounting,
the kernel against a plain reference, modules (prefill + decode == full forward, caches,
gradients), HSR decoding over GTA's cache."""

import math

import pytest
import torch

import hsr
from hsr.gta import (GQAAttention, GQAConfig, GTAAttention, GTACache, GTAConfig, KVCache, MHAConfig, MLAAttention,
                     MLACache, MLAConfig, accounting_table, paper_configs)
from hsr.models import ATTENTIONS, TinyLM, TinyLMConfig, matched_ffn_size
from reference import attention_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- configs and accounting

def test_paper_1b_accounting():
    cfgs = paper_configs("1B")
    gta, gqa = cfgs["GTA"], cfgs["GQA"]
    assert (gta.hidden_size, gta.num_heads, gta.num_q_groups, gta.num_k_heads, gta.num_c_groups, gta.head_dim,
            gta.latent_dim) == (1280, 20, 5, 1, 1, 64, 128)
    assert gta.kv_cache_elements_per_token() == 192 and gqa.kv_cache_elements_per_token() == 640
    assert gta.attention_flops(1) == 960 and gqa.attention_flops(1) == 2560
    assert gta.attention_flops(1000) == 960 * 10 ** 6
    assert 1 - 192 / 640 == pytest.approx(0.70) and 1 - 960 / 2560 == pytest.approx(0.625)
    assert cfgs["MHA"].kv_cache_elements_per_token() == 2 * 20 * 64
    mla = cfgs["MLA"]  # DeepSeek-V2 ratios: latent 4 d_h, shared RoPE key d_h / 2; absorbed decode
    assert mla.kv_cache_elements_per_token() == 256 + 32
    assert mla.attention_flops(1) == 20 * (256 + 32 + 256)


def test_accounting_table_rows():
    rows = accounting_table()
    assert {(r["shape"], r["attention"]) for r in rows} == {(s, a) for s in ("160M", "500M", "1B")
                                                          for a in ("MHA", "GQA", "MLA", "GTA")}
    for r in rows:
        assert r["kv_vs_gqa"] > 0 and r["flops_vs_gqa"] > 0
        if r["attention"] == "GTA":
            assert r["kv_vs_gqa"] < 1 and r["flops_vs_gqa"] == pytest.approx(0.375)


def test_attention_params_match_the_modules():
    for cfg, cls in ((GTAConfig(64, 8, 4, 2, 1, 16, 32), GTAAttention), (GQAConfig(64, 8, 2, 16), GQAAttention),
                     (MHAConfig(64, 4, 16), GQAAttention), (MLAConfig(64, 4, 24, 16, 8, 12), MLAAttention)):
        assert sum(p.numel() for p in cls(cfg).parameters()) == cfg.attention_params()


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_heads=6, num_q_groups=4), "num_heads \\(6\\) must be a multiple of num_q_groups"),
    (dict(num_q_groups=4, num_k_heads=3), "num_q_groups \\(4\\) must be a multiple of num_k_heads"),
    (dict(num_q_groups=4, num_c_groups=3), "multiple of num_c_groups"),
    (dict(latent_dim=8), "latent_dim \\(8\\) must be at least head_dim"),
    (dict(head_dim=15, latent_dim=32), "even"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(num_k_heads=1.5), "num_k_heads must be a positive integer"),
    (dict(rope_theta=-1.0), "rope_theta"),
])
def test_bad_gta_configs_are_rejected(kwargs, message):
    base = dict(hidden_size=64, num_heads=8, num_q_groups=4, num_k_heads=1, num_c_groups=1, head_dim=16,
                latent_dim=32)
    with pytest.raises(ValueError, match=message):
        GTAConfig(**{**base, **kwargs})


def test_bad_gqa_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        GQAConfig(64, 8, 3, 16)
    with pytest.raises(ValueError, match="GTAAttention: config must be a GTAConfig"):
        GTAAttention(GQAConfig(64, 8, 2, 16))
    with pytest.raises(ValueError, match="one of"):
        paper_configs("7B")
    with pytest.raises(ValueError, match="rope_dim must be even"):
        MLAConfig(64, 4, 24, 16, 7, 12)
    with pytest.raises(ValueError, match="kv_rank must be a positive integer"):
        MLAConfig(64, 4, 0, 16, 8, 12)


# ---------------------------------------------------------------- the kernel

def gta_ref(q, k, c, w_p, gate, causal):
    """fp64: expand key heads and latents to the query groups, attend, decode per head."""
    nq = q.shape[1]
    z, _ = attention_ref(q, k.repeat_interleave(nq // k.shape[1], 1), c.repeat_interleave(nq // c.shape[1], 1),
                         causal=causal)
    r = w_p.shape[0] // nq
    out = torch.matmul(z.repeat_interleave(r, 1), w_p.double())
    return out * torch.sigmoid(gate.double()) if gate is not None else out


def make_gta_inputs(nq, nk, nc, heads, lq, lk, d, dl, dtype, device, seed=0, dout=None, batch=2):
    g = torch.Generator().manual_seed(seed)
    dout = d if dout is None else dout
    q = torch.randn(batch, nq, lq, d, generator=g)
    k = torch.randn(batch, nk, lk, d, generator=g)
    c = torch.randn(batch, nc, lk, dl, generator=g)
    w_p = torch.randn(heads, dl, dout, generator=g) / math.sqrt(dl)
    gate = torch.randn(batch, heads, lq, dout, generator=g)
    return [t.to(dtype=dtype, device=device) for t in (q, k, c, w_p, gate)]


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk,nc", [(5, 1, 1), (4, 2, 1), (4, 1, 2), (4, 2, 4), (2, 2, 2)])
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 97), (1, 1025), (7, 97), (3, 5000)])
def test_gta_attention_matches_reference(device, dtype, nq, nk, nc, lq, lk):
    dims = [(64, 128)] if device == "cuda" else [(64, 128), (33, 97)]
    for d, dl in dims:
        q, k, c, w_p, gate = make_gta_inputs(nq, nk, nc, 2 * nq, lq, lk, d, dl, dtype, device, seed=lq + lk + nk)
        for causal in (False, True):
            for g in (gate, None):
                out, lse = hsr.gta_attention(q, k, c, w_p, g, causal=causal, return_lse=True)
                ref = gta_ref(*(t.cpu() for t in (q, k, c, w_p)), None if g is None else g.cpu(), causal)
                assert out.shape == (2, 2 * nq, lq, d) and out.dtype == dtype and lse.shape == (2, nq, lq)
                err = (out.cpu().double() - ref).abs().max().item()
                assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), (d, dl, causal, err)


def test_gta_attention_other_decoder_width_and_scale():
    q, k, c, w_p, gate = make_gta_inputs(4, 1, 1, 8, 2, 50, 16, 40, torch.float32, "cpu", dout=24)
    out = hsr.gta_attention(q, k, c, w_p, gate, scale=0.3)
    nq = 4
    z, _ = attention_ref(q, k.expand(-1, nq, -1, -1), c.expand(-1, nq, -1, -1), scale=0.3)
    ref = torch.matmul(z.repeat_interleave(2, 1), w_p.double()) * torch.sigmoid(gate.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_gta_attention_empty_queries():
    q, k, c, w_p, gate = make_gta_inputs(4, 1, 1, 8, 0, 10, 16, 32, torch.float32, "cpu")
    out, lse = hsr.gta_attention(q, k, c, w_p, gate, return_lse=True)
    assert out.shape == (2, 8, 0, 16) and lse.shape == (2, 4, 0)


def _gta_args():
    return make_gta_inputs(4, 1, 1, 8, 1, 10, 16, 32, torch.float32, "cpu")


GTA_BAD = [
    ("q must be 4-D", lambda q, k, c, w, g: (q[0], k, c, w, g)),
    ("c must be 4-D", lambda q, k, c, w, g: (q, k, c[0], w, g)),
    ("multiple of the number of key heads", lambda q, k, c, w, g: (q[:, :3], k.expand(-1, 2, -1, -1), c, w, g)),
    ("multiple of the number of key heads", lambda q, k, c, w, g: (q, k.expand(-1, 3, -1, -1), c, w, g)),
    ("same number of keys", lambda q, k, c, w, g: (q, k, c[:, :, :5], w, g)),
    ("head_dim", lambda q, k, c, w, g: (q, k[..., :8], c, w, g)),
    ("w_p must be", lambda q, k, c, w, g: (q, k, c, w[:, :16], g)),
    ("w_p must be", lambda q, k, c, w, g: (q, k, c, w[:6], g)),
    ("gate must be", lambda q, k, c, w, g: (q, k, c, w, g[:, :4])),
    ("share one dtype", lambda q, k, c, w, g: (q, k, c.double(), w, g)),
    ("w_p must be", lambda q, k, c, w, g: (q, k, c, w.half(), g)),
    ("at least one key", lambda q, k, c, w, g: (q, k[:, :, :0], c[:, :, :0], w, g)),
]


@pytest.mark.parametrize("message,make", GTA_BAD, ids=[f"{m}{i}" for i, (m, _) in enumerate(GTA_BAD)])
def test_gta_attention_bad_inputs(message, make):
    args = make(*_gta_args())
    with pytest.raises((ValueError, RuntimeError), match=message):
        hsr.gta_attention(*args)
    with pytest.raises((ValueError, RuntimeError), match=message):  # the op itself checks too
        torch.ops.hsr.gta_attention(*args)


def test_gta_attention_opcheck():
    q, k, c, w_p, gate = _gta_args()
    torch.library.opcheck(torch.ops.hsr.gta_attention.default, (q, k, c, w_p, gate), {"causal": True})


# ---------------------------------------------------------------- modules and caches

def gta_cfg(**kw):
    base = dict(hidden_size=48, num_heads=6, num_q_groups=3, num_k_heads=1, num_c_groups=1, head_dim=8,
                latent_dim=24)
    return GTAConfig(**{**base, **kw})


MODULE_CASES = {
    "gta": lambda: GTAAttention(gta_cfg()),
    "gta_nk3_nc3": lambda: GTAAttention(gta_cfg(num_k_heads=3, num_c_groups=3)),
    "gta_nk1_nc3": lambda: GTAAttention(gta_cfg(num_c_groups=3)),
    "gqa": lambda: GQAAttention(GQAConfig(48, 6, 2, 8)),
    "mha": lambda: GQAAttention(MHAConfig(48, 6, 8)),
    "mla": lambda: MLAAttention(MLAConfig(48, 6, 20, 8, 4, 10)),
}


@pytest.mark.parametrize("name", list(MODULE_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_then_decode_equals_full_forward(name, dtype):
    torch.manual_seed(0)
    m = MODULE_CASES[name]().to(dtype)
    x = torch.randn(2, 40, 48).to(dtype)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        parts = [m(x[:, :17], cache=cache), m(x[:, 17:30], cache=cache)]  # prefill, then a chunk
        parts += [m(x[:, i:i + 1], cache=cache) for i in range(30, 40)]   # one-token steps
    assert cache.length == 40
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(torch.cat(parts, 1).float(), full.float(), atol=tol, rtol=tol)


def test_gta_cache_contents_and_size():
    torch.manual_seed(1)
    m = GTAAttention(gta_cfg(num_k_heads=3, num_c_groups=3))
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        cache = m.new_cache(2)
        m(x[:, :5], cache=cache)
        m(x[:, 5:], cache=cache)
        q, k, lat, gate = m.project(x, 0)
    assert isinstance(cache, GTACache)
    assert cache.keys.shape == (2, 3, 9, 8) and cache.latents.shape == (2, 3, 9, 24)
    torch.testing.assert_close(cache.keys, k)       # post-RoPE keys
    torch.testing.assert_close(cache.latents, lat)
    assert cache.elements_per_token() == 2 * m.config.kv_cache_elements_per_token() == 2 * (3 * 8 + 3 * 24)
    assert cache.nbytes == 9 * 2 * (3 * 8 + 3 * 24) * 4
    g = GQAAttention(GQAConfig(48, 6, 2, 8))
    kv = g.new_cache(2)
    with torch.no_grad():
        g(x, cache=kv)
    assert isinstance(kv, KVCache) and kv.nbytes == 9 * 2 * 2 * 2 * 8 * 4


def test_rope_is_applied_at_the_cache_positions():
    # Relative positions only: the same two tokens at positions (0, 1) or (5, 6) give the
    # same scores, so a decode step at position p attends as the full forward does.
    from hsr.gta import rope
    x = torch.randn(1, 1, 2, 8)
    a, b = rope(x, 0, 10000.0), rope(x, 5, 10000.0)
    torch.testing.assert_close(a[0, 0, 0] @ a[0, 0, 1], b[0, 0, 0] @ b[0, 0, 1])
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["gta", "gqa", "mla"])
def test_cache_path_with_autograd_runs_in_torch(name):
    torch.manual_seed(2)
    m = MODULE_CASES[name]()
    x = torch.randn(1, 12, 48)
    cache = m.new_cache(1)
    y = torch.cat([m(x[:, :8], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(8, 12)], 1)
    y.sum().backward()
    assert m.o_proj.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)


def test_gta_gradcheck():
    torch.manual_seed(3)
    m = GTAAttention(GTAConfig(8, 4, 2, 1, 2, 4, 6)).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    params = dict(m.named_parameters())

    def as_function(w_p, g_w, k_w):
        return torch.func.functional_call(m, {**params, "w_p": w_p, "g_proj.weight": g_w, "k_proj.weight": k_w},
                                          (x.detach(),))
    assert torch.autograd.gradcheck(as_function, (params["w_p"], params["g_proj.weight"], params["k_proj.weight"]))


def test_mla_gradcheck():
    torch.manual_seed(5)
    m = MLAAttention(MLAConfig(8, 2, 6, 4, 2, 3)).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_mla_cache_holds_latent_and_rope_key():
    torch.manual_seed(6)
    m = MLAAttention(MLAConfig(48, 6, 20, 8, 4, 10))
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        cache = m.new_cache(2)
        m(x, cache=cache)
        _, _, c_kv, k_rope = m.project(x, 0)
    assert isinstance(cache, MLACache) and cache.entries.shape == (2, 1, 7, 24)
    torch.testing.assert_close(cache.latents, c_kv)
    torch.testing.assert_close(cache.entries[..., 20:], k_rope)
    assert cache.nbytes == 7 * 2 * 24 * 4
    with pytest.raises(ValueError, match="k_rope must be"):
        cache.append(c_kv[:, :, :1], k_rope[:, :, :2])
    assert cache.length == 7


def test_gqa_gradcheck():
    torch.manual_seed(4)
    m = GQAAttention(GQAConfig(8, 4, 2, 4)).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_module_bad_inputs_leave_the_cache_unchanged():
    m = GTAAttention(gta_cfg())
    cache = m.new_cache(2)
    with torch.no_grad():
        m(torch.randn(2, 3, 48), cache=cache)
        with pytest.raises(ValueError, match="x must be"):
            m(torch.randn(2, 3, 40), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            m(torch.randn(3, 1, 48), cache=cache)
        with pytest.raises(ValueError, match="cache must be"):
            m(torch.randn(2, 1, 48), cache=KVCache(2, 1, 8))
        with pytest.raises(ValueError, match="c must be"):
            cache.append(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 7))
    assert cache.length == 3
    with pytest.raises(ValueError, match="dtype"):
        GTACache(1, 1, 8, 1, 16, dtype=torch.int32)


# ---------------------------------------------------------------- HSR decoding over GTA's cache

def test_hsr_kvcache_with_latent_values_certifies_the_latent_output():
    g = torch.Generator().manual_seed(5)
    B, nq, d, dl, n = 1, 5, 16, 32, 700
    centers = torch.randn(6, d, generator=g) * 3
    k = (centers[torch.randint(0, 6, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)).view(B, 1, n, d)
    c = torch.randn(B, 1, n, dl, generator=g)
    for eps in (0.0, 1e-3, 1e-1):
        cache = hsr.HSRKVCache(B, 1, d, value_dim=dl, leaf_size=16, policy=hsr.Softmax(eps=eps),
                               dense_fallback=False)
        cache.prefill(k[:, :, :-1], c[:, :, :-1])
        q = torch.randn(B, nq, 1, d, generator=g) * 1.5
        z, info = cache.decode(q, k[:, :, -1:], c[:, :, -1:])
        dense = hsr.attention(q, k, c)
        err = (z - dense).double().norm(dim=-1)[..., 0]
        assert z.shape == (B, nq, 1, dl)
        assert (info.mass_bound <= eps + 1e-12).all()
        assert (err <= info.error_bound + 1e-5).all(), (eps, err, info.error_bound)
        if eps == 0.0:
            assert float(err.max()) < 1e-5
    with pytest.raises(ValueError, match=r"v must be \(1, 1, L, 32\)"):
        cache.extend(k[:, :, :3], c[:, :, :3, :16])


def test_gta_module_hsr_cache_decodes_like_the_dense_cache():
    torch.manual_seed(6)
    m = GTAAttention(gta_cfg(num_q_groups=3, head_dim=16, latent_dim=32))
    x = torch.randn(1, 300, 48)
    with torch.no_grad():
        full = m(x)
        for eps in (0.0, 1e-2):
            cache = m.hsr_cache(1, policy=hsr.Softmax(eps=eps), leaf_size=16, dense_fallback=False)
            out = [m(x[:, :250], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(250, 300)]
            diff = (torch.cat(out, 1) - full).abs().max().item()
            info = m.last_decode_info
            assert (info.mass_bound <= eps + 1e-12).all()
            assert diff < (1e-5 if eps == 0 else 0.5)
            assert cache.length == 300
    with pytest.raises(ValueError, match="num_c_groups == num_k_heads"):
        GTAAttention(gta_cfg(num_c_groups=3)).hsr_cache(1)


# ---------------------------------------------------------------- the tiny LMs

def small_lm(attention, **kw):
    return TinyLMConfig(attention=attention, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, kv_heads=2,
                        q_groups=2, latent_dim=16, ffn_size=64, **kw)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_tiny_lm_prefill_and_decode_equal_full_forward(attention):
    torch.manual_seed(7)
    model = TinyLM(small_lm(attention)).eval()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2)
        steps = [model(ids[:, :20], caches)] + [model(ids[:, i:i + 1], caches) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["gta", "relu"])
def test_tiny_lm_hsr_caches_are_exact_when_asked(attention):
    torch.manual_seed(8)
    model = TinyLM(small_lm(attention)).eval()
    with torch.no_grad():
        for b in model.blocks:
            if attention == "relu":
                b.attn.bias.fill_(0.05)  # some keys get weight 0: the ReLU path skips them exactly
    ids = torch.randint(0, 256, (1, 200))
    kw = dict(policy=hsr.Softmax(eps=0.0)) if attention == "gta" else {}
    with torch.no_grad():
        full = model(ids)
        caches = model.hsr_caches(1, leaf_size=16, dense_fallback=False, **kw)
        steps = [model(ids[:, :150], caches)] + [model(ids[:, i:i + 1], caches) for i in range(150, 200)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="gta' or 'relu'"):
        TinyLM(small_lm("gqa")).hsr_caches(1)
    with pytest.raises(ValueError, match="is for inference"):
        model(ids[:, :5], model.hsr_caches(1, **kw))  # autograd on


def test_matched_parameter_budgets():
    budget = TinyLM(small_lm("mha")).num_parameters()
    for attention in ATTENTIONS:
        cfg = matched_ffn_size(small_lm(attention), budget)
        assert abs(TinyLM(cfg).num_parameters() - budget) <= cfg.num_layers * 3 * cfg.hidden_size
    assert small_lm("gta").kv_cache_elements_per_token() == 2 * (8 + 16)
    assert small_lm("gqa").kv_cache_elements_per_token() == 2 * 2 * 2 * 8


def test_tiny_lm_trains():
    torch.manual_seed(9)
    model = TinyLM(small_lm("gta"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 16, (4, 33))  # a 16-symbol alphabet: learnable in a few steps
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_tiny_lm_bad_inputs():
    with pytest.raises(ValueError, match="attention must be one of"):
        TinyLMConfig(attention="linear")
    with pytest.raises(ValueError, match="latent_dim"):
        TinyLMConfig(attention="gta", latent_dim=4, head_dim=16)
    model = TinyLM(small_lm("gqa"))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), 256))
    with pytest.raises(ValueError, match="one cache per layer"):
        model(torch.zeros(1, 3, dtype=torch.int64), caches=[])
