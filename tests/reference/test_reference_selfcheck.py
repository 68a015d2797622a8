#!/usr/bin/env python3
"""Self-test of tests/reference/yuan2_reference.py (run: python3 <this file>).

Builds a random tiny Yuan2-M32 as an HF directory (the parity config of tests/reference: 2 layers,
hidden 64, 4 heads, head_dim 32 (P = 128), rotary_dim 16, 8 experts top-2, ffn 96, vocab 97)
and checks, against explicit loop implementations written directly from docs/model.md:
  (a) safetensors write -> read round trip for F32, F64, BF16, I64 (+ F16, I32, BOOL, U8);
  (b) causality: changing a later token leaves earlier logits unchanged;
  (c) LFA (§3) against a per-timestep loop of y1/y2/RMSNorm with tap 0 = previous token;
  (d) interleaved Q/K split (§4.1) against a per-head loop over q_proj / k_proj rows;
  (e) identical logits from model.safetensors, sharded safetensors + index, pytorch_model.bin
      and sharded .bin + index;
  (f) attention router (§5): logits, top-k indices and gates against a per-token loop over
      A_ij = q_i k_j, row softmax, r_i = sum_j P_ij v_j, softmax over the two largest r;
      linear router (docs/routers.md) likewise;
  plus: RoPE (§4.2) against a per-element loop, explicit arange position ids == default,
  reset position ids change the logits, fp32 vs fp64 agreement, the CLI round trip, and a
  full-model loop forward (per token, per head) against the batched forward.
Exits non-zero if any check fails.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import yuan2_reference as yr  # noqa: E402

TINY = dict(layers=2, hidden=64, heads=4, head_dim=32, rotary_dim=16, experts=8, top_k=2,
            ffn=96, vocab=97)


def tiny_config(router_type="attention", rope_base=10000.0):
    t = TINY
    return {
        "architectures": ["YuanForCausalLM"],
        "model_type": "yuan",
        "hidden_size": t["hidden"],
        "attention_projection_size": t["heads"] * t["head_dim"],
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "intermediate_size": 2 * t["hidden"],
        "hidden_act": "silu",
        "vocab_size": t["vocab"],
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "use_moe": True,
        "moe_config": {
            "moe_num_experts": t["experts"],
            "moe_top_k": t["top_k"],
            "ffn_hidden_size": t["ffn"],
            "gated_linear_unit": True,
            "norm_topk_prob": True,
        },
        "tie_word_embeddings": True,
        "rotary_dim": t["rotary_dim"],
        "rotary_base": rope_base,
        "router_type": router_type,
    }


def tiny_weights(router_type="attention", seed=0):
    """Random weights with the §8.1 names/shapes. Scales are larger than the §7 init so
    that routing, attention and LFA are far from degenerate."""
    g = torch.Generator().manual_seed(seed)
    t = TINY
    H, P, E, Fw, V = t["hidden"], t["heads"] * t["head_dim"], t["experts"], t["ffn"], t["vocab"]

    def n(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def u(*shape, bound):
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    sd = {"model.embed_tokens.weight": n(V, H, std=1.0)}
    for l in range(t["layers"]):
        p = "model.layers.%d." % l
        sd[p + "input_layernorm.weight"] = 1 + n(H)
        sd[p + "post_attention_layernorm.weight"] = 1 + n(H)
        sd[p + "self_attn.q_proj.weight"] = n(P, H, std=0.15)
        sd[p + "self_attn.k_proj.weight"] = n(P, H, std=0.15)
        sd[p + "self_attn.v_proj.weight"] = n(P, H)
        sd[p + "self_attn.o_proj.weight"] = n(H, P)
        sd[p + "self_attn.lf_gate.conv1.weight"] = u(H // 2, H, 2, 1, bound=1 / math.sqrt(2 * H))
        sd[p + "self_attn.lf_gate.conv1.bias"] = u(H // 2, bound=0.2)
        sd[p + "self_attn.lf_gate.conv2.weight"] = u(H, H // 2, 2, 1, bound=1 / math.sqrt(H))
        sd[p + "self_attn.lf_gate.conv2.bias"] = u(H, bound=0.2)
        sd[p + "self_attn.lf_gate.output_layernorm.weight"] = 1 + n(H)
        if router_type == "attention":
            for w in ("query", "key", "value"):
                sd[p + "mlp.gate.%s.weight" % w] = n(E, H, std=0.3)
        else:
            sd[p + "mlp.gate.weight"] = n(E, H, std=0.3)
        for e in range(E):
            sd[p + "mlp.experts.%d.w1.weight" % e] = n(2 * Fw, H, std=0.15)
            sd[p + "mlp.experts.%d.w2.weight" % e] = n(H, Fw, std=0.1)
    sd["model.norm.weight"] = 1 + n(H)
    return sd


def write_hf_dir(d, cfg, sd, form="single"):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    names = sorted(sd)
    if form == "single":
        yr.save_safetensors(sd, os.path.join(d, "model.safetensors"))
    elif form in ("sharded", "sharded_bin"):
        nshard = 3
        parts = [names[i::nshard] for i in range(nshard)]
        wmap = {}
        for i, part in enumerate(parts):
            if form == "sharded":
                fn = "model-%05d-of-%05d.safetensors" % (i + 1, nshard)
                yr.save_safetensors({k: sd[k] for k in part}, os.path.join(d, fn))
                index = "model.safetensors.index.json"
            else:
                fn = "pytorch_model-%05d-of-%05d.bin" % (i + 1, nshard)
                torch.save({k: sd[k].clone() for k in part}, os.path.join(d, fn))
                index = "pytorch_model.bin.index.json"
            for k in part:
                wmap[k] = fn
        with open(os.path.join(d, index), "w") as f:
            json.dump({"metadata": {}, "weight_map": wmap}, f)
    elif form == "bin":
        torch.save(dict(sd), os.path.join(d, "pytorch_model.bin"))
    else:
        raise ValueError(form)
    return d


# ------------------------------------------------------------------------------------------
# Loop implementations written directly from the document
# ------------------------------------------------------------------------------------------

def lfa_loop(sd, l, a, eps=1e-6):
    """§3 formula, one timestep at a time. a: [S,H] (one sequence)."""
    p = "model.layers.%d.self_attn.lf_gate." % l
    w1, b1 = sd[p + "conv1.weight"], sd[p + "conv1.bias"]
    w2, b2 = sd[p + "conv2.weight"], sd[p + "conv2.bias"]
    nw = sd[p + "output_layernorm.weight"]
    W1p, W1c = w1[:, :, 0, 0], w1[:, :, 1, 0]
    W2p, W2c = w2[:, :, 0, 0], w2[:, :, 1, 0]
    S, H = a.shape
    out = torch.zeros_like(a)
    a_prev = torch.zeros(H, dtype=a.dtype)
    y1_prev = torch.zeros(H // 2, dtype=a.dtype)  # literal zero frame (no b1)
    for t in range(S):
        y1 = W1c @ a[t] + W1p @ a_prev + b1
        y2 = W2c @ y1 + W2p @ y1_prev + b2
        z = y2 + a[t]
        out[t] = nw * z / torch.sqrt((z * z).mean() + eps)
        a_prev, y1_prev = a[t], y1
    return out


def qk_loop(sd, l, x, heads, head_dim):
    """§4.1: head h's query rows [2dh*h, 2dh*h+dh) and key rows [2dh*h+dh, 2dh*(h+1)) of the
    fused [q_proj; k_proj]; heads 0..n/2-1 live in q_proj, heads n/2.. in k_proj."""
    p = "model.layers.%d.self_attn." % l
    qw, kw = sd[p + "q_proj.weight"], sd[p + "k_proj.weight"]
    half = heads // 2
    S = x.shape[0]
    Q = torch.zeros(S, heads, head_dim, dtype=x.dtype)
    K = torch.zeros(S, heads, head_dim, dtype=x.dtype)
    for h in range(heads):
        src, hh = (qw, h) if h < half else (kw, h - half)
        base = 2 * head_dim * hh
        for t in range(S):
            Q[t, h] = src[base:base + head_dim] @ x[t]
            K[t, h] = src[base + head_dim:base + 2 * head_dim] @ x[t]
    return Q, K


def rope_loop(x, pos, r, base):
    """§4.2 per element. x: [S, n_h, d_h] (float64), pos: [S] ints."""
    out = x.clone()
    half = r // 2
    for t in range(x.shape[0]):
        m = int(pos[t])
        for i in range(half):
            th = base ** (-2.0 * i / r)
            c, s = math.cos(m * th), math.sin(m * th)
            out[t, :, i] = x[t, :, i] * c - x[t, :, i + half] * s
            out[t, :, i + half] = x[t, :, i + half] * c + x[t, :, i] * s
    return out


def attention_router_loop(sd, l, m, top_k):
    """§5 per token, per i, per j. m: [T,H]. Returns r [T,E], idx [T,k], gates [T,k]."""
    p = "model.layers.%d.mlp.gate." % l
    Wq, Wk, Wv = sd[p + "query.weight"], sd[p + "key.weight"], sd[p + "value.weight"]
    E = Wq.shape[0]
    T = m.shape[0]
    r = torch.zeros(T, E, dtype=m.dtype)
    for t in range(T):
        q, k, v = Wq @ m[t], Wk @ m[t], Wv @ m[t]
        for i in range(E):
            A = [float(q[i] * k[j]) for j in range(E)]
            mx = max(A)
            ex = [math.exp(a - mx) for a in A]
            Z = sum(ex)
            r[t, i] = sum(ex[j] / Z * float(v[j]) for j in range(E))
    return r, topk_softmax_loop(r, top_k)


def topk_softmax_loop(r, top_k):
    T, E = r.shape
    idx = torch.zeros(T, top_k, dtype=torch.int64)
    gates = torch.zeros(T, top_k, dtype=r.dtype)
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(r[t, e]))[:top_k]
        sel = [float(r[t, e]) for e in order]
        mx = max(sel)
        ex = [math.exp(s - mx) for s in sel]
        for j in range(top_k):
            idx[t, j] = order[j]
            gates[t, j] = ex[j] / sum(ex)
    return idx, gates


def full_forward_loop(sd, cfg, tokens, pos, eps=1e-6):
    """Whole model, one sequence, per token/per head loops (float64), from §2–§6 only."""
    t_ = TINY
    H, nh, dh, r = t_["hidden"], t_["heads"], t_["head_dim"], cfg["rotary_dim"]
    E, k, Fw = t_["experts"], t_["top_k"], t_["ffn"]
    sd = {n: w.double() for n, w in sd.items()}
    S = len(tokens)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean() + eps)

    x = torch.stack([sd["model.embed_tokens.weight"][int(tok)] for tok in tokens])
    for l in range(t_["layers"]):
        p = "model.layers.%d." % l
        a = torch.stack([rms(x[t], sd[p + "input_layernorm.weight"]) for t in range(S)])
        lf = lfa_loop(sd, l, a, eps)
        Q, K = qk_loop(sd, l, lf, nh, dh)
        Q = rope_loop(Q, pos, r, cfg["rotary_base"])
        K = rope_loop(K, pos, r, cfg["rotary_base"])
        Vw = sd[p + "self_attn.v_proj.weight"]
        Vv = torch.stack([(Vw @ a[t]).view(nh, dh) for t in range(S)])
        O = torch.zeros(S, nh * dh, dtype=torch.float64)
        for t in range(S):
            for h in range(nh):
                sc = [float(Q[t, h] @ K[j, h]) / math.sqrt(dh) for j in range(t + 1)]
                mx = max(sc)
                ex = [math.exp(s - mx) for s in sc]
                Z = sum(ex)
                O[t, h * dh:(h + 1) * dh] = sum(ex[j] / Z * Vv[j, h] for j in range(t + 1))
        x = x + torch.stack([sd[p + "self_attn.o_proj.weight"] @ O[t] for t in range(S)])
        m = torch.stack([rms(x[t], sd[p + "post_attention_layernorm.weight"]) for t in range(S)])
        _, (idx, gates) = attention_router_loop(sd, l, m, k)
        for t in range(S):
            acc = torch.zeros(H, dtype=torch.float64)
            for j in range(k):
                e = int(idx[t, j])
                u = sd[p + "mlp.experts.%d.w1.weight" % e] @ m[t]
                hdn = torch.nn.functional.silu(u[:Fw]) * u[Fw:]
                acc = acc + gates[t, j] * (sd[p + "mlp.experts.%d.w2.weight" % e] @ hdn)
            x[t] = x[t] + acc
    hfin = torch.stack([rms(x[t], sd["model.norm.weight"]) for t in range(S)])
    return hfin @ sd["model.embed_tokens.weight"].t()


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------

RESULTS = []


def check(name, fn):
    try:
        msg = fn()
        RESULTS.append((name, True, msg or ""))
        print("PASS %-40s %s" % (name, msg or ""))
    except Exception as exc:  # noqa: BLE001
        RESULTS.append((name, False, repr(exc)))
        print("FAIL %-40s %r" % (name, exc))
        traceback.print_exc()


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def main():
    tmp = tempfile.TemporaryDirectory(prefix="yuan2ref_")
    root = tmp.name
    cfg = tiny_config("attention")
    sd = tiny_weights("attention", seed=0)
    d_single = write_hf_dir(os.path.join(root, "single"), cfg, sd, "single")
    g = torch.Generator().manual_seed(123)
    B, S = 2, 11
    tokens = torch.randint(0, TINY["vocab"], (B, S), generator=g)

    m64 = yr.load_model(d_single, dtype=torch.float64)
    m32 = yr.load_model(d_single, dtype=torch.float32)
    sd64 = {k: v.double() for k, v in sd.items()}

    # (a) safetensors round trip
    def t_roundtrip():
        gg = torch.Generator().manual_seed(7)
        ts = {
            "f32": torch.randn(3, 5, generator=gg),
            "f64": torch.randn(4, generator=gg, dtype=torch.float64),
            "bf16": torch.randn(2, 3, 4, generator=gg).bfloat16(),
            "i64": torch.randint(-2**62, 2**62, (7,), generator=gg, dtype=torch.int64),
            "f16": torch.randn(6, generator=gg).half(),
            "i32": torch.randint(-2**31, 2**31 - 1, (2, 2), generator=gg, dtype=torch.int32),
            "bool": torch.tensor([True, False, True]),
            "u8": torch.arange(256, dtype=torch.uint8),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
            "odd": torch.randn(1, generator=gg).bfloat16(),  # 2 bytes: misaligns later data
        }
        p = os.path.join(root, "rt.safetensors")
        yr.save_safetensors(ts, p)
        with open(p, "rb") as f:
            raw = f.read()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0, "header not 8-byte padded"
        hdr = json.loads(raw[8:8 + n])
        assert hdr["__metadata__"] == {"format": "pt"}, hdr["__metadata__"]
        assert hdr["bf16"]["dtype"] == "BF16" and hdr["i64"]["dtype"] == "I64"
        back = yr.load_safetensors(p)
        assert set(back) == set(ts), set(back) ^ set(ts)
        for k, v in ts.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            assert torch.equal(back[k], v), k
        # raw layout: little-endian, offsets relative to the data start
        b, e = hdr["f32"]["data_offsets"]
        first = torch.frombuffer(bytearray(raw[8 + n + b:8 + n + b + 4]), dtype=torch.float32)
        assert float(first[0]) == float(ts["f32"][0, 0])
        return "%d tensors" % len(ts)
    check("(a) safetensors round trip", t_roundtrip)

    # (b) causality
    def t_causal():
        base = m64.forward(tokens)
        worst = 0.0
        for j in (1, 5, S - 1):
            t2 = tokens.clone()
            t2[:, j] = (t2[:, j] + 1) % TINY["vocab"]
            out = m64.forward(t2)
            worst = max(worst, maxdiff(out[:, :j], base[:, :j]))
            assert maxdiff(out[:, j:], base[:, j:]) > 1e-3, "later logits did not change"
        assert worst < 1e-12, worst
        return "max |d earlier| = %.1e" % worst
    check("(b) causality", t_causal)

    # (c) LFA vs per-timestep loop
    def t_lfa():
        gg = torch.Generator().manual_seed(5)
        a = torch.randn(B, S, TINY["hidden"], generator=gg, dtype=torch.float64)
        worst = 0.0
        for l in range(TINY["layers"]):
            out = m64.lfa(l, a)
            for b in range(B):
                worst = max(worst, maxdiff(out[b], lfa_loop(sd64, l, a[b])))
        assert worst < 1e-12, worst
        # tap convention sanity: the output at t=0 must not depend on any other token,
        # and t depends on t-2 but not on t-3
        a2 = a.clone()
        a2[:, 3] += 1.0
        d = (m64.lfa(0, a2) - m64.lfa(0, a)).abs().amax(dim=(0, 2))
        assert float(d[:3].max()) == 0.0 and float(d[6:].max()) == 0.0, d
        assert float(d[3:6].min()) > 0, d
        return "max diff %.1e; receptive field t-2..t" % worst
    check("(c) LFA vs per-timestep loop", t_lfa)

    # (d) Q/K split vs per-head loop
    def t_qk():
        gg = torch.Generator().manual_seed(6)
        x = torch.randn(B, S, TINY["hidden"], generator=gg, dtype=torch.float64)
        worst = 0.0
        for l in range(TINY["layers"]):
            q, k = m64.qk(l, x)
            for b in range(B):
                Q, K = qk_loop(sd64, l, x[b], TINY["heads"], TINY["head_dim"])
                worst = max(worst, maxdiff(q[b], Q), maxdiff(k[b], K))
        assert worst < 1e-12, worst
        return "max diff %.1e" % worst
    check("(d) interleaved Q/K vs per-head loop", t_qk)

    def t_rope():
        gg = torch.Generator().manual_seed(8)
        x = torch.randn(1, S, TINY["heads"], TINY["head_dim"], generator=gg, dtype=torch.float64)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 300, 5000, 40000, 7]])
        cos, sin = m64.rope_tables(pos)
        out = m64.apply_rope(x, cos, sin)
        ref = rope_loop(x[0], pos[0], TINY["rotary_dim"], cfg["rotary_base"])
        w = maxdiff(out[0], ref)
        assert w < 1e-12, w
        assert torch.equal(out[0, :, :, TINY["rotary_dim"]:], x[0, :, :, TINY["rotary_dim"]:])
        return "max diff %.1e" % w
    check("RoPE vs per-element loop", t_rope)

    # (e) same logits from the other checkpoint forms
    def t_forms():
        ref = m32.forward(tokens)
        msgs = []
        for form in ("sharded", "bin", "sharded_bin"):
            d = write_hf_dir(os.path.join(root, form), cfg, sd, form)
            out = yr.load_model(d, dtype=torch.float32).forward(tokens)
            assert torch.equal(out, ref), (form, maxdiff(out, ref))
            msgs.append(form)
        # untied lm_head present but equal to the embedding: also identical
        sd2 = dict(sd)
        sd2["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        d = write_hf_dir(os.path.join(root, "with_lm_head"), cfg, sd2, "sharded")
        assert torch.equal(yr.load_model(d).forward(tokens), ref)
        # bf16-stored weights (as the published checkpoint): loaded and upcast, equal to the
        # model built from the bf16-rounded weights stored as fp32
        sd_bf = {k: v.bfloat16() for k, v in sd.items()}
        d_bf = write_hf_dir(os.path.join(root, "bf16"), cfg, sd_bf, "sharded")
        d_rd = write_hf_dir(os.path.join(root, "bf16r"), cfg,
                            {k: v.float() for k, v in sd_bf.items()}, "bin")
        assert torch.equal(yr.load_model(d_bf).forward(tokens),
                           yr.load_model(d_rd).forward(tokens))
        return "bit-identical: single, " + ", ".join(msgs) + ", +lm_head; bf16 storage ok"
    check("(e) sharded safetensors / .bin forms", t_forms)

    # (f) routers
    def t_router_attention():
        gg = torch.Generator().manual_seed(9)
        m = torch.randn(B * S, TINY["hidden"], generator=gg, dtype=torch.float64)
        worst_r, worst_g = 0.0, 0.0
        for l in range(TINY["layers"]):
            r, idx, gates = m64.route(l, m)
            r_ref, (idx_ref, g_ref) = attention_router_loop(sd64, l, m, TINY["top_k"])
            worst_r = max(worst_r, maxdiff(r, r_ref))
            assert torch.equal(idx, idx_ref), (idx, idx_ref)
            worst_g = max(worst_g, maxdiff(gates, g_ref))
            # properties from §5: r is a convex combination of v; gates sum to 1
            v = m @ sd64["model.layers.%d.mlp.gate.value.weight" % l].t()
            assert bool((r <= v.max(-1, keepdim=True).values + 1e-12).all())
            assert bool((r >= v.min(-1, keepdim=True).values - 1e-12).all())
            assert maxdiff(gates.sum(-1), torch.ones(B * S)) < 1e-12
        assert worst_r < 1e-12 and worst_g < 1e-12, (worst_r, worst_g)
        # HF form: softmax over all E, top-k, divide by the sum -> identical gates
        p = torch.softmax(r, -1)
        top, _ = torch.topk(p, TINY["top_k"], -1)
        assert maxdiff(top / top.sum(-1, keepdim=True), gates) < 1e-12
        nsel = len(set(idx.flatten().tolist()))
        return "r %.1e, gates %.1e, %d/%d experts used" % (worst_r, worst_g, nsel, TINY["experts"])
    check("(f) attention router vs loop", t_router_attention)

    def t_router_linear():
        cfg_l = tiny_config("linear")
        sd_l = tiny_weights("linear", seed=1)
        d = write_hf_dir(os.path.join(root, "linear"), cfg_l, sd_l, "single")
        ml = yr.load_model(d, dtype=torch.float64)
        gg = torch.Generator().manual_seed(10)
        m = torch.randn(B * S, TINY["hidden"], generator=gg, dtype=torch.float64)
        worst = 0.0
        for l in range(TINY["layers"]):
            r, idx, gates = ml.route(l, m)
            W = sd_l["model.layers.%d.mlp.gate.weight" % l].double()
            r_ref = torch.stack([W @ m[t] for t in range(B * S)])
            idx_ref, g_ref = topk_softmax_loop(r_ref, TINY["top_k"])
            assert torch.equal(idx, idx_ref)
            worst = max(worst, maxdiff(r, r_ref), maxdiff(gates, g_ref))
        assert worst < 1e-12, worst
        out = ml.forward(tokens)
        assert torch.isfinite(out).all()
        return "max diff %.1e; forward ok" % worst
    check("(f') linear router vs loop", t_router_linear)

    def t_positions():
        base = m64.forward(tokens)
        explicit = m64.forward(tokens, torch.arange(S).unsqueeze(0).expand(B, S))
        assert torch.equal(base, explicit)
        reset = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6])  # e.g. reset after an <eod>
        out = m64.forward(tokens, reset)
        assert maxdiff(out[:, :4], base[:, :4]) < 1e-12  # not bitwise: batched GEMMs
        assert maxdiff(out[:, 4:], base[:, 4:]) > 1e-6
        return "explicit arange == default; reset changes only later logits"
    check("position ids", t_positions)

    def t_full_loop():
        pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
        toks = tokens[0, :9]
        out = m64.forward(toks.unsqueeze(0), pos)[0]
        ref = full_forward_loop(sd, cfg, toks.tolist(), pos.tolist())
        w = maxdiff(out, ref)
        assert w < 1e-9, w
        return "max diff %.1e (fp64)" % w
    check("full forward vs loop model", t_full_loop)

    def t_fp32_fp64():
        a, b = m32.forward(tokens), m64.forward(tokens)
        w = maxdiff(a, b)
        scale = float(b.abs().max())
        assert w < 1e-4 * max(1.0, scale), (w, scale)
        return "max |fp32 - fp64| %.1e (max |logit| %.1f)" % (w, scale)
    check("fp32 vs fp64", t_fp32_fp64)

    def t_cli():
        tin = os.path.join(root, "tokens.safetensors")
        tout = os.path.join(root, "logits.safetensors")
        pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]] * B)
        yr.save_safetensors({"tokens": tokens.clone(), "position_ids": pos}, tin)
        subprocess.run([sys.executable, os.path.join(HERE, "yuan2_reference.py"), d_single,
                        "--tokens", tin, "--out", tout], check=True)
        got = yr.load_safetensors(tout)
        assert set(got) == {"logits"} and got["logits"].dtype == torch.float32
        assert torch.equal(got["logits"], m32.forward(tokens, pos))
        return "logits %s" % list(got["logits"].shape)
    check("CLI round trip", t_cli)

    tmp.cleanup()
    failed = [n for n, ok, _ in RESULTS if not ok]
    print("\n%d checks, %d failed%s" % (len(RESULTS), len(failed),
                                       (": " + ", ".join(failed)) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
