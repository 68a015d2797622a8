#!/usr/bin/env python3
"""Independent numerical reference for the Yuan 2.0-M32 forward pass (eval mode).

Written from the model description in docs/model.md (and docs/routers.md), NOT from the
C++ implementation.  Plain PyTorch (run on the project environment's PyTorch 2.11), fp32 or fp64.

Implements (section numbers of docs/model.md):
  §2   pre-norm decoder layer: a = RMSNorm_in(x); V from a; LFA(a) -> Q/K; causal attention;
       x += O Wo^T; m = RMSNorm_post(x); x += MoE(m); final RMSNorm; logits = h E^T (tied).
       RMSNorm y = w * x / sqrt(mean(x^2) + eps), statistics in the compute dtype (>= fp32).
  §3   LFA: two Conv2d, kernel (2,1), stride 1, padding (1,0), keep the first S outputs
       (tap 0 = previous token, tap 1 = current token; the zero frame before y1 has no b1),
       then RMSNorm_lfa(y2 + a).
  §4.1 per-head interleaved Q|K: Wqk = cat(q_proj.weight, k_proj.weight, 0), output viewed
       as [.., n_h, 2*d_h] and split in halves (q first).  V heads contiguous.
  §4.2 partial NeoX rotate-half RoPE on the first rotary_dim dims of each head; the tables are
       computed in fp64 from exact integer positions and cast to the compute dtype
       (§12.2 recommendation: no bf16 positions / bf16 inv_freq).
  §4.3 scale 1/sqrt(d_h), causal mask, no dropout.
  §5   attention router (default): q,k,v = Wq m, Wk m, Wv m in R^E; P = softmax_row(q k^T)
       (no scaling); r = P v; top-k of r; gates = softmax over the k selected logits.
       docs/routers.md linear router ("router_type": "linear"): r = W m, same top-k + softmax.
       norm_topk_prob false -> gates = softmax(r over all E)[selected] (docs/routers.md,
       pre-softmax without renorm); M32 uses true.
  §6   SwiGLU experts: u = W1 m, h = silu(u[:F]) * u[F:], out = W2 h; dropless;
       MoE(m) = sum_k g_k * Expert_{i_k}(m).  No aux / z losses.
  §8   HF weight names, shapes and config.json keys (see load_model).

Ambiguities resolved here (see also the report in the commit message):
  * RoPE base: the HF config has no key (§8.3, §12.1).  Order of precedence: explicit
    `rope_base` argument / --rope-base, then config keys "rotary_base", "rope_theta",
    "rope_base"; otherwise 10000, the value hard-wired in the HF modelling code.  The released
    weights were fine-tuned with 40890 (§12.1): pass it explicitly when that is wanted.
  * rotary_dim: config "rotary_dim" if present, else hidden_size // num_attention_heads (the HF
    code's choice, §4.2).
  * head_dim = attention_projection_size / num_attention_heads (§1: 4096/16 = 256;
    attention_projection_size defaults to hidden_size if absent); scale
    1/sqrt(head_dim) (§4.3, not the vLLM 1/sqrt(H/n_h), §12.3).
  * Tied embeddings: tie = config.get("tie_word_embeddings", True) (YuanConfig default, §8.3).
    tie -> logits use model.embed_tokens.weight (a present lm_head.weight that differs is
    ignored with a warning, as HF's tie_weights would); not tie -> lm_head.weight (falls back to
    the embedding with a warning if absent).
  * MoE config: "moe_config": {moe_num_experts, moe_top_k, ffn_hidden_size, norm_topk_prob}
    (§8.3); flat top-level keys of the same names are accepted as a fallback.
  * Position ids: 0..S-1 per row unless given (e.g. reset after <eod>, §4.2); the attention mask
    and the LFA are never reset (§3 "Packed samples", §4.2).
  * Gate accumulation order: the k selected experts are summed in top-k order (torch.topk,
    descending logit); this differs from HF's index_add_ order only by fp rounding.
  * Top-k ties are resolved by torch.topk (implementation-dependent, §12.7).

API:  load_model(hf_dir, dtype=torch.float32, rope_base=None, rope_tables="exact") -> YuanReference
      YuanReference.forward(tokens[B,S] int64, position_ids=None) -> logits [B,S,V] (dtype)
CLI:  yuan2_reference.py HF_DIR --tokens IN.safetensors --out OUT.safetensors
      [--dtype fp32|fp64] [--rope-base B] [--rope-tables exact|hf_bf16|megatron_bf16]
      reads "tokens" ([B,S] or [S], any integer dtype) and optional "position_ids";
      writes "logits" as F32.
"""

import argparse
import glob
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# safetensors: minimal reader / writer (no dependency on the `safetensors` package)
# Format: u64 little-endian header length N, N bytes of JSON header, then the raw data buffer.
# Header: {name: {"dtype": str, "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
# with offsets relative to the start of the data buffer.  Data are little-endian, C-contiguous.
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover
    raise RuntimeError("this reader assumes a little-endian host")


def _tensor_to_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # same element size; numpy has no bfloat16
    return t.numpy().tobytes()


def save_safetensors(tensors, path, metadata=None):
    """Write a dict name -> tensor as a .safetensors file."""
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise ValueError("unsupported dtype %s for %s" % (t.dtype, name))
        data = _tensor_to_bytes(t)
        header[name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    meta = {"format": "pt"}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    header["__metadata__"] = meta
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)  # pad header so the data start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for c in chunks:
            f.write(c)


def load_safetensors(path):
    """Read a .safetensors file into a dict name -> tensor (CPU, the stored dtype)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError("%s: too short for safetensors" % path)
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError("%s: header length %d beyond end of file" % (path, n))
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError("%s: unsupported dtype %s for %s" % (path, info["dtype"], name))
        shape = [int(s) for s in info["shape"]]
        b, e = info["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        esize = torch.empty((), dtype=dt).element_size()
        if e - b != numel * esize or base + e > len(raw):
            raise ValueError("%s: bad data_offsets for %s" % (path, name))
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dt)
            continue
        buf = bytearray(raw[base + b:base + e])  # writable copy, avoids the frombuffer warning
        if dt == torch.bfloat16:
            t = torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16)
        else:
            t = torch.frombuffer(buf, dtype=dt)
        out[name] = t.reshape(shape)
    return out


# ----------------------------------------------------------------------------------------------
# Loading an HF-layout directory (§8)
# ----------------------------------------------------------------------------------------------

def load_state_dict(hf_dir):
    """All tensors of the checkpoint in hf_dir: model.safetensors, sharded safetensors with
    model.safetensors.index.json, pytorch_model.bin, or sharded .bin with its index."""
    def from_index(index_path, loader):
        with open(index_path) as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
        sd = {}
        for fn in files:
            part = loader(os.path.join(hf_dir, fn))
            for k, v in part.items():
                if k in sd:
                    raise ValueError("tensor %s appears in more than one shard" % k)
                sd[k] = v
        missing = [k for k in index["weight_map"] if k not in sd]
        if missing:
            raise ValueError("index lists tensors not found in shards: %s" % missing[:5])
        return sd

    def torch_load(p):
        return torch.load(p, map_location="cpu")

    # Preference: single file, indexed shards, unindexed shards; safetensors before .bin.
    for single, index, pattern, load in (
            ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", load_safetensors),
            ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin", torch_load)):
        p = os.path.join(hf_dir, single)
        if os.path.exists(p):
            return load(p)
        p = os.path.join(hf_dir, index)
        if os.path.exists(p):
            return from_index(p, load)
        shards = sorted(glob.glob(os.path.join(hf_dir, pattern)))
        if shards:
            sd = {}
            for s in shards:
                sd.update(load(s))
            return sd
    raise FileNotFoundError("no model.safetensors / pytorch_model*.bin in %s" % hf_dir)


class Config:
    """The subset of config.json (§8.3) the forward pass needs, plus the optional extras."""

    def __init__(self, cfg, rope_base=None):
        self.raw = cfg
        moe = cfg.get("moe_config") or {}

        def moe_key(k, default=None):
            if k in moe:
                return moe[k]
            if k in cfg:
                return cfg[k]
            if default is None:
                raise KeyError("config.json: missing moe_config.%s" % k)
            return default

        self.hidden = int(cfg["hidden_size"])
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.proj = int(cfg.get("attention_projection_size", self.hidden))
        if self.proj % self.heads:
            raise ValueError("attention_projection_size not divisible by num_attention_heads")
        self.head_dim = self.proj // self.heads
        self.vocab = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.experts = int(moe_key("moe_num_experts"))
        self.top_k = int(moe_key("moe_top_k"))
        self.ffn = int(moe_key("ffn_hidden_size"))
        self.norm_topk_prob = bool(moe_key("norm_topk_prob", True))
        if not bool(moe_key("gated_linear_unit", True)):
            raise ValueError("only gated (SwiGLU) experts are supported (§6)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError("only hidden_act silu is supported")
        self.rotary_dim = int(cfg.get("rotary_dim", self.hidden // self.heads))
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError("rotary_dim must be even and <= head_dim")
        if rope_base is None:
            for k in ("rotary_base", "rope_theta", "rope_base"):
                if k in cfg:
                    rope_base = cfg[k]
                    break
        self.rope_base = float(rope_base if rope_base is not None else 10000.0)
        self.router_type = cfg.get("router_type", "attention")
        if self.router_type not in ("attention", "linear"):
            raise ValueError("router_type must be 'attention' or 'linear'")
        self.tie = bool(cfg.get("tie_word_embeddings", True))


class YuanReference:
    def __init__(self, config, sd, dtype=torch.float32, rope_tables="exact"):
        if rope_tables not in ("exact", "hf_bf16", "megatron_bf16"):
            raise ValueError("rope_tables must be exact, hf_bf16 or megatron_bf16")
        self.cfg = c = config
        self.dtype = dtype
        self.rope_mode = rope_tables
        used = set()

        def get(name, shape):
            if name not in sd:
                raise KeyError("missing tensor %s" % name)
            t = sd[name]
            if list(t.shape) != list(shape):
                raise ValueError("%s: shape %s, expected %s" % (name, list(t.shape), list(shape)))
            used.add(name)
            return t.to(dtype)

        H, P, E, Fw, V = c.hidden, c.proj, c.experts, c.ffn, c.vocab
        self.embed = get("model.embed_tokens.weight", [V, H])
        self.layers = []
        for l in range(c.layers):
            pre = "model.layers.%d." % l
            L = {}
            L["in_norm"] = get(pre + "input_layernorm.weight", [H])
            L["post_norm"] = get(pre + "post_attention_layernorm.weight", [H])
            a = pre + "self_attn."
            L["q_proj"] = get(a + "q_proj.weight", [P, H])
            L["k_proj"] = get(a + "k_proj.weight", [P, H])
            L["v_proj"] = get(a + "v_proj.weight", [P, H])
            L["o_proj"] = get(a + "o_proj.weight", [H, P])
            g = a + "lf_gate."
            L["conv1_w"] = get(g + "conv1.weight", [H // 2, H, 2, 1])
            L["conv1_b"] = get(g + "conv1.bias", [H // 2])
            L["conv2_w"] = get(g + "conv2.weight", [H, H // 2, 2, 1])
            L["conv2_b"] = get(g + "conv2.bias", [H])
            L["lfa_norm"] = get(g + "output_layernorm.weight", [H])
            m = pre + "mlp."
            if c.router_type == "attention":
                L["router_q"] = get(m + "gate.query.weight", [E, H])
                L["router_k"] = get(m + "gate.key.weight", [E, H])
                L["router_v"] = get(m + "gate.value.weight", [E, H])
            else:
                L["router_w"] = get(m + "gate.weight", [E, H])
            L["w1"] = [get(m + "experts.%d.w1.weight" % e, [2 * Fw, H]) for e in range(E)]
            L["w2"] = [get(m + "experts.%d.w2.weight" % e, [H, Fw]) for e in range(E)]
            self.layers.append(L)
        self.final_norm = get("model.norm.weight", [H])
        if c.tie:
            self.lm_head = self.embed
            if "lm_head.weight" in sd:
                used.add("lm_head.weight")
                if not torch.equal(sd["lm_head.weight"].to(dtype), self.embed):
                    print("warning: tie_word_embeddings is true; ignoring an lm_head.weight "
                          "that differs from model.embed_tokens.weight", file=sys.stderr)
        elif "lm_head.weight" in sd:
            self.lm_head = get("lm_head.weight", [V, H])
        else:
            print("warning: tie_word_embeddings is false but lm_head.weight is absent; "
                  "using model.embed_tokens.weight", file=sys.stderr)
            self.lm_head = self.embed
        unused = sorted(k for k in sd if k not in used and "rotary_emb" not in k)
        if unused:
            print("warning: %d unused tensors, e.g. %s" % (len(unused), unused[:3]), file=sys.stderr)

    # ---- building blocks ---------------------------------------------------------------------

    def rmsnorm(self, x, w):
        """§2: y = w * x / sqrt(mean(x^2) + eps); statistics in at least fp32."""
        xs = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return w * y.to(x.dtype)

    def lfa(self, l, a):
        """§3, in the reference Conv2d formulation.  a: [B,S,H] -> [B,S,H]."""
        L = self.layers[l]
        S = a.shape[1]
        x = a.permute(0, 2, 1).unsqueeze(-1)  # [B, H, S, 1]: sequence on the conv "height" axis
        y1 = F.conv2d(x, L["conv1_w"], L["conv1_b"], stride=1, padding=(1, 0))[:, :, :S]
        y2 = F.conv2d(y1, L["conv2_w"], L["conv2_b"], stride=1, padding=(1, 0))[:, :, :S]
        y2 = y2.squeeze(-1).permute(0, 2, 1)  # [B, S, H]
        return self.rmsnorm(y2 + a, L["lfa_norm"])

    def qk(self, l, lfa_out):
        """§4.1: fused Wqk = cat(q_proj, k_proj); per head [q(d_h) | k(d_h)].
        Returns Q, K as [B, S, n_h, d_h] (before RoPE)."""
        L = self.layers[l]
        B, S, _ = lfa_out.shape
        wqk = torch.cat([L["q_proj"], L["k_proj"]], 0)  # [2P, H]
        qk = (lfa_out @ wqk.t()).view(B, S, self.cfg.heads, 2 * self.cfg.head_dim)
        q, k = torch.split(qk, self.cfg.head_dim, dim=-1)
        return q, k

    def rope_tables(self, position_ids):
        """§4.2 / §12.2: exact tables from exact integer positions (computed in fp64), or the
        bf16 tables of a reference implementation (rope_tables "hf_bf16" / "megatron_bf16").
        position_ids: [B,S] int64 -> cos, sin [B, S, rotary_dim/2] in the compute dtype."""
        r = self.cfg.rotary_dim
        dev = position_ids.device
        if self.rope_mode == "hf_bf16":
            # As the HF code builds its cache: inv_freq held in bf16, positions arange'd in
            # inv_freq's dtype, the outer product and cos/sin computed by bf16 ops; rows indexed
            # by position id.
            inv_freq = (1.0 / (self.cfg.rope_base ** (torch.arange(0, r, 2, device=dev).float() / r))).to(torch.bfloat16)
            t = torch.arange(int(position_ids.max()) + 1, dtype=inv_freq.dtype, device=dev)
            freqs = torch.einsum("i,j->ij", t, inv_freq)  # [T, r/2] bf16
            cos, sin = freqs.cos(), freqs.sin()
            return cos[position_ids].to(self.dtype), sin[position_ids].to(self.dtype)
        if self.rope_mode == "megatron_bf16":
            # Float16Module rounds the inv_freq buffer to bf16; Megatron casts it back to fp32 and
            # builds exact fp32 positions, angles and cos/sin.
            inv_freq = (1.0 / (self.cfg.rope_base ** (torch.arange(0, r, 2, device=dev).float() / r)))
            inv_freq = inv_freq.to(torch.bfloat16).float()
            ang = position_ids.float().unsqueeze(-1) * inv_freq
            return torch.cos(ang).to(self.dtype), torch.sin(ang).to(self.dtype)
        i = torch.arange(0, r // 2, dtype=torch.float64, device=dev)
        inv_freq = self.cfg.rope_base ** (-2.0 * i / r)  # theta_i = base^(-2i/r)
        ang = position_ids.to(torch.float64).unsqueeze(-1) * inv_freq  # [B, S, r/2]
        return torch.cos(ang).to(self.dtype), torch.sin(ang).to(self.dtype)

    def apply_rope(self, x, cos, sin):
        """NeoX rotate-half on dims [0, r) of each head; dims [r, d_h) unchanged.
        x: [B, S, n_h, d_h]; cos/sin: [B, S, r/2]."""
        r = self.cfg.rotary_dim
        half = r // 2
        c = cos.unsqueeze(2)
        s = sin.unsqueeze(2)
        x1 = x[..., :half]
        x2 = x[..., half:r]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., r:]], dim=-1)

    def attention(self, l, a, lfa_out, position_ids):
        """§2/§4: returns O Wo^T, [B,S,H]."""
        L = self.layers[l]
        c = self.cfg
        B, S, _ = a.shape
        v = (a @ L["v_proj"].t()).view(B, S, c.heads, c.head_dim)  # V reads a, not the LFA
        q, k = self.qk(l, lfa_out)
        cos, sin = self.rope_tables(position_ids)
        q = self.apply_rope(q, cos, sin)
        k = self.apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, n_h, S, d_h]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(c.head_dim)
        causal = torch.ones(S, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = (probs @ v).transpose(1, 2).reshape(B, S, c.proj)
        return o @ L["o_proj"].t()

    def router_logits(self, l, m):
        """§5 attention router / docs/routers.md linear router.  m: [T,H] -> r: [T,E]."""
        L = self.layers[l]
        if self.cfg.router_type == "linear":
            return m @ L["router_w"].t()
        q = m @ L["router_q"].t()  # [T, E]
        k = m @ L["router_k"].t()
        v = m @ L["router_v"].t()
        A = q.unsqueeze(2) * k.unsqueeze(1)  # A[t,i,j] = q_i k_j, no 1/sqrt scaling
        P = torch.softmax(A, dim=-1)  # over experts j
        return (P * v.unsqueeze(1)).sum(-1)  # r_i = sum_j P_ij v_j

    def route(self, l, m):
        """Returns (r [T,E], idx [T,k], gates [T,k])."""
        r = self.router_logits(l, m)
        top, idx = torch.topk(r, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            gates = torch.softmax(top, dim=-1)  # == softmax(r)[S] / sum over S
        else:
            gates = torch.softmax(r, dim=-1).gather(-1, idx)
        return r, idx, gates

    def expert(self, l, e, x):
        """§6 SwiGLU: u = W1 x; silu(u[:F]) * u[F:]; W2."""
        L = self.layers[l]
        u = x @ L["w1"][e].t()
        h = F.silu(u[:, :self.cfg.ffn]) * u[:, self.cfg.ffn:]
        return h @ L["w2"][e].t()

    def moe(self, l, m):
        """§5/§6 dropless top-k MoE.  m: [B,S,H]."""
        shape = m.shape
        x = m.reshape(-1, shape[-1])
        _, idx, gates = self.route(l, x)
        out = torch.zeros_like(x)
        for slot in range(self.cfg.top_k):
            for e in range(self.cfg.experts):
                sel = (idx[:, slot] == e).nonzero(as_tuple=True)[0]
                if sel.numel() == 0:
                    continue
                y = self.expert(l, e, x[sel])
                out[sel] += gates[sel, slot].unsqueeze(-1) * y
        return out.view(shape)

    def layer(self, l, x, position_ids):
        L = self.layers[l]
        a = self.rmsnorm(x, L["in_norm"])
        lfa_out = self.lfa(l, a)
        x = x + self.attention(l, a, lfa_out, position_ids)
        m = self.rmsnorm(x, L["post_norm"])
        return x + self.moe(l, m)

    @torch.no_grad()
    def forward(self, tokens, position_ids=None):
        tokens = torch.as_tensor(tokens).long()
        if tokens.dim() != 2:
            raise ValueError("tokens must be [B, S]")
        B, S = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(S, dtype=torch.int64, device=tokens.device).unsqueeze(0).expand(B, S)
        else:
            position_ids = torch.as_tensor(position_ids, device=tokens.device).long()
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            position_ids = position_ids.expand(B, S)
        x = self.embed[tokens]  # no embedding scaling (§1)
        for l in range(self.cfg.layers):
            x = self.layer(l, x, position_ids)
        h = self.rmsnorm(x, self.final_norm)
        return h @ self.lm_head.t()

    __call__ = forward


def load_model(hf_dir, dtype=torch.float32, rope_base=None, rope_tables="exact"):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = Config(json.load(f), rope_base=rope_base)
    return YuanReference(cfg, load_state_dict(hf_dir), dtype=dtype, rope_tables=rope_tables)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Yuan2-M32 reference forward pass (logits)")
    ap.add_argument("hf_dir")
    ap.add_argument("--tokens", required=True, help="safetensors with 'tokens' [B,S] (+ 'position_ids')")
    ap.add_argument("--out", required=True, help="output safetensors with 'logits' (F32)")
    ap.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32")
    ap.add_argument("--rope-base", type=float, default=None)
    ap.add_argument("--rope-tables", choices=["exact", "hf_bf16", "megatron_bf16"], default="exact",
                    help="RoPE tables: exact, or the bf16 ones of the HF / Megatron code (§12.2)")
    args = ap.parse_args(argv)
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    model = load_model(args.hf_dir, dtype=dtype, rope_base=args.rope_base, rope_tables=args.rope_tables)
    inp = load_safetensors(args.tokens)
    tokens = inp["tokens"].long()
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    pos = inp.get("position_ids")
    if pos is not None:
        pos = pos.long()
    logits = model.forward(tokens, pos)
    save_safetensors({"logits": logits.float().contiguous()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
