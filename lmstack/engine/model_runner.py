"""The only engine file that touches tensors: KV pool, flattened batch preparation, forward, logits.

Batch layout (vLLM style): all scheduled sequences' new tokens are concatenated into one row,
tokens (1, T) with per-token positions. Decodes (one new token) come first, then prefill chunks.
`PagedMeta.attend` is called by every layer with that row's q/k/v (after RoPE): it writes the new
k/v into the paged pool at `slot_mapping` (slot = block_id * block_size + offset), then
  - decodes, on CPU with lmstack's C++ kernel (lmstack/cpu_kernels.py; float32 / bf16 pools): one call for
    all of them, each sequence attending over its K/V where it lies in the pool (PagedAttention).
  - decodes otherwise (no compiler, other devices and dtypes): sequences are grouped by context
    length (each group's lengths within 2x of its longest, so padding wastes < half); per group,
    every sequence's blocks are gathered (whole blocks, one index_select) into one padded
    (S, Hkv, Lmax, D) tensor and a single SDPA call runs with an additive mask for the padding (and
    sliding window). The G query heads that share a KV head are laid out as G "query positions", so
    GQA needs no K/V copy.
  - prefill chunks: one SDPA call per sequence; when the chunk is the whole context (no cached
    prefix) it attends over its own k/v with `is_causal`, otherwise over its gathered context with
    the query offset (chunked prefill, prefix-cache hit, recompute after preemption).
Only the hidden state of the last token of each sequence that completes its pending tokens goes
through the LM head: never full-vocab logits for every prompt token.
A step of decodes only, on CPU, skips the Python forward when the model allows: `CppDecode` runs
every layer in one C++ call (csrc/decode_layers.cpp) with the same kernels and the same results.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack import cpu_kernels
from lmstack.model import layers
from lmstack.model.attention import attention
from lmstack.model.layers import (FusedLinears, Linear, RMSNorm, bf16_packing_supported, fuse_projections,
                                  pack_weights)
from lmstack.model.transformer import Transformer

logger = logging.getLogger(__name__)


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass
class DecodeGroup:
    """Decode sequences attended together: rows in the step's token row (None = all decodes, in
    order), block tables (S, nblk) padded with block 0, and context lengths (S,)."""

    rows: torch.Tensor | None
    blocks: torch.Tensor
    ctx_lens: torch.Tensor


def group_by_length(ctx_lens: list[int], min_group: int = 4) -> list[list[int]]:
    """Indices grouped so each group's lengths are within 2x of its longest (so padding every member
    to the longest wastes less than half), longest first; groups smaller than `min_group` join the
    previous group rather than cost a call of their own."""
    order = sorted(range(len(ctx_lens)), key=lambda i: -ctx_lens[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (2 * ctx_lens[i] > ctx_lens[groups[-1][0]] or len(groups[-1]) < min_group):
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) > 1 and len(groups[-1]) < min_group:
        groups[-2].extend(groups.pop())
    return groups


class PagedMeta:
    """Per-step attention metadata; owns no state beyond this step (the pool belongs to the runner)."""

    def __init__(self, k_blocks: list[torch.Tensor], v_blocks: list[torch.Tensor], slot_mapping: torch.Tensor,
                 num_decodes: int, dec_groups: list[DecodeGroup],
                 prefills: list[tuple[int, int, int, torch.Tensor | None]], dtype: torch.dtype,
                 kernel: bool = False) -> None:
        self.k_blocks, self.v_blocks = k_blocks, v_blocks  # per layer (num_blocks, block_size, Hkv, D)
        self.slot_mapping = slot_mapping  # (T,) pool slot (block_id * block_size + offset) of every new token
        self.num_decodes = num_decodes
        self.dec_groups = dec_groups
        # prefill chunks: (start in row, num new tokens, num tokens before the chunk, block ids | None)
        self.prefills = prefills
        self.dtype = dtype
        self.kernel = kernel  # decodes through cpu_kernels.paged_decode_attention (one group, no padding)
        self._dec_masks: dict[tuple[int, int | None], torch.Tensor] = {}

    @staticmethod
    def gather(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """Whole blocks, copied in block-sized chunks (much faster than gathering token rows):
        pool (num_blocks, bs, Hkv, D), block_ids (..., nblk) -> (..., nblk * bs, Hkv, D)."""
        bs, Hkv, D = pool.shape[1:]
        out = pool.index_select(0, block_ids.reshape(-1))
        return out.view(*block_ids.shape[:-1], block_ids.shape[-1] * bs, Hkv, D)

    def _decode_mask(self, gi: int, window: int | None) -> torch.Tensor:
        """(S, 1, 1, Lmax) additive mask of decode group gi: 0 where key j is visible to the query at
        ctx_len - 1. Built once per step and reused by every layer."""
        m = self._dec_masks.get((gi, window))
        if m is None:
            g = self.dec_groups[gi]
            L = g.blocks.shape[1] * self.k_blocks[0].shape[1]
            j = torch.arange(L, device=g.ctx_lens.device)[None, :]
            ctx = g.ctx_lens[:, None]
            ok = j < ctx
            if window is not None:
                ok &= (ctx - 1 - j) < window
            m = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill_(~ok, float("-inf"))[:, None, None, :]
            self._dec_masks[(gi, window)] = m
        return m

    def _decode_sdpa(self, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, out: torch.Tensor,
                     window: int | None) -> None:
        """The PyTorch decode path: per length group, gather its blocks into a padded copy and run one
        masked SDPA call. q (1, T, H, D) in the pool's dtype; writes the decodes' rows of out (T, H, D)."""
        H, D = q.shape[2:]
        Hkv = kb.shape[2]
        nd = self.num_decodes
        for gi, g in enumerate(self.dec_groups):
            qg = q[0, :nd] if g.rows is None else q[0, g.rows]
            S = qg.shape[0]
            qd = qg.view(S, Hkv, H // Hkv, D)  # (S, Hkv, G, D): G query heads per kv head
            kd = self.gather(kb, g.blocks).transpose(1, 2)  # (S, Hkv, Lmax, D)
            vd = self.gather(vb, g.blocks).transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self._decode_mask(gi, window))
            if g.rows is None:
                out[:nd] = od.reshape(S, H, D)
            else:
                out[g.rows] = od.reshape(S, H, D).to(out.dtype)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None) -> torch.Tensor:
        # q (1, T, H, D); k, v (1, T, Hkv, D)
        _, T, H, D = q.shape
        Hkv = k.shape[2]
        kb, vb = self.k_blocks[layer_idx], self.v_blocks[layer_idx]
        flat = (-1, Hkv, D)
        kb.view(flat).index_copy_(0, self.slot_mapping, k[0].to(kb.dtype))
        vb.view(flat).index_copy_(0, self.slot_mapping, v[0].to(vb.dtype))
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        # attention runs in the pool's dtype (bf16 K/V under an fp32 forward with bf16 linears)
        q, k, v = q.to(kb.dtype), k.to(kb.dtype), v.to(kb.dtype)
        nd = self.num_decodes
        if self.kernel and nd:  # one group of all decodes, attended in place in the pool
            g = self.dec_groups[0]
            out[:nd] = cpu_kernels.paged_decode_attention(q[0, :nd], kb, vb, g.blocks, g.ctx_lens, D ** -0.5, window)
        elif nd:
            self._decode_sdpa(q, kb, vb, out, window)
        for start, n, n_before, ctx_blocks in self.prefills:
            qs = q[:, start:start + n].transpose(1, 2)  # (1, H, n, D)
            if ctx_blocks is None:  # the chunk is the whole context
                ks, vs = k[:, start:start + n].transpose(1, 2), v[:, start:start + n].transpose(1, 2)
            else:
                L = n_before + n
                ks = self.gather(kb, ctx_blocks)[:L].transpose(0, 1)[None]  # (1, Hkv, n_before + n, D)
                vs = self.gather(vb, ctx_blocks)[:L].transpose(0, 1)[None]
            o = attention(qs, ks, vs, impl="sdpa", causal=True, window=window, q_offset=n_before)
            out[start:start + n] = o[0].transpose(0, 1)
        return out[None]


# how each projection is computed (csrc/decode_layers.cpp LinearMode; mirrors layers._project)
PLAIN, ONEDNN, PACKED, PACKED_FP32 = 0, 1, 2, 3


def _mode(packed: layers.PackedWeight | None, weight: torch.Tensor, act: torch.dtype) -> int:
    if packed is not None:
        if act == torch.bfloat16 and weight.dtype == torch.bfloat16:
            return PACKED
        if packed.from_fp32 and act == torch.float32 and weight.dtype == torch.float32:
            return PACKED_FP32
    if layers._ONEDNN and act == torch.float32 and weight.dtype == torch.float32 and weight.is_contiguous():
        return ONEDNN
    return PLAIN


@dataclass
class DecodePlan:
    """Per-layer tensors for decode_layers (weights already packed where the mode says so)."""

    in_norm: list[torch.Tensor]
    post_norm: list[torch.Tensor]
    final_norm: torch.Tensor
    q_norm: list[torch.Tensor]  # Qwen3's per-head q / k norms (empty without them)
    k_norm: list[torch.Tensor]
    qkv: list[torch.Tensor]
    qkv_b: list[torch.Tensor | None]
    o: list[torch.Tensor]
    o_b: list[torch.Tensor | None]
    gu: list[torch.Tensor]
    gu_b: list[torch.Tensor | None]
    down: list[torch.Tensor]
    down_b: list[torch.Tensor | None]
    mode: int
    eps: float


class CppDecode:
    """Pure-decode engine steps on CPU in one C++ call (csrc/decode_layers.cpp): every decoder layer back to
    back without returning to Python, the CPU counterpart of replaying a captured CUDA graph.

    Why: a decode step of a small model is dominated by interpreter overhead. The eager forward makes ~20
    module calls and tensor ops per layer, about 0.2-0.3 ms of Python per layer here, as much as the
    layer's weight streaming (SmolLM2-135M shape, 32 sequences). The C++ loop runs the same kernels (oneDNN
    linears on the same packed weights, lmstack's norm / RoPE / silu / PagedAttention kernels) at the same
    rounding points, so its hidden states equal the eager path's bit for bit (tests/test_cpu_decode.py).

    Which models: the Llama-style decoder (RMSNorm, RoPE, SwiGLU MLP, optional q/k/v / o / MLP biases,
    Qwen3's per-head q/k norms) whose projections are still the plain fused Linears the engine set up. A
    LoRA or quantized-linear swap, GPT-2 (LayerNorm, learned positions), and every step that carries a
    prefill chunk run `model(tokens, positions, meta=PagedMeta)` instead. `plan()` checks this
    every step (a swap or a dtype change between steps is seen), in ~0.08 ms.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.steps = 0  # decode steps run through C++ (tests check the path is taken)
        # the last plan and what it was built from: (oneDNN on, (owner, attribute, module) triples, tensors,
        # their (data_ptr, _version) keys, plan)
        self._cache: tuple | None = None

    def reset(self) -> None:
        """Forget the cached plan (and its packed weights): after writes through `.data`, which no version
        counter sees (LLM.reset_cache calls this with drop_packed_weights)."""
        self._cache = None

    def plan(self) -> DecodePlan | None:
        """The tensors of every layer, or None when some part of the model is not what the C++ loop computes.

        Cached: rebuilt (~0.9 ms for 30 layers) only when a module was swapped or a weight replaced or updated
        in place (the same (data_ptr, _version) keys the packed copies follow); checking costs ~0.1 ms."""
        c = self._cache
        # submodules live in `_modules`, the fused groups in `__dict__` (plain getattr on a Module is slower)
        if (c is not None and c[0] == layers._ONEDNN and len(self.model.model.layers) == len(c[4].in_norm)
                and all((o._modules.get(a) if a in o._modules else o.__dict__.get(a)) is v for o, a, v in c[1])
                and [(t.data_ptr(), t._version) for t in c[2]] == c[3]):
            return c[4]
        self._cache = c = None  # drop the old plan's packed copies before `_build` repacks (no two at once)
        mods: list[tuple] = []
        tensors: list[torch.Tensor] = []
        p = self._build(mods, tensors)
        self._cache = None if p is None else (layers._ONEDNN, mods, tensors,
                                              [(t.data_ptr(), t._version) for t in tensors], p)
        return p

    def _build(self, mods: list[tuple], tensors: list[torch.Tensor]) -> DecodePlan | None:
        """plan() without the cache; records the modules and tensors the plan depends on."""
        m = self.model
        act = m.dtype
        if m.rotary is None or act not in (torch.float32, torch.bfloat16) or m.device.type != "cpu":
            return None
        final = m.model.norm
        if type(final) is not RMSNorm or final.weight.dtype != act or cpu_kernels.load() is None:
            return None
        p = DecodePlan([], [], final.weight, [], [], [], [], [], [], [], [], [], [], -1, final.eps)
        mods += [(m, "rotary", m.rotary), (m.model, "norm", final), (m.model, "layers", m.model.layers)]
        tensors.append(final.weight)

        def add(proj, weight: torch.Tensor, bias: torch.Tensor | None, sources, ws: list, bs: list) -> bool:
            md = _mode(proj.packed, weight, act)
            if p.mode != md and p.mode != -1:
                return False
            p.mode = md
            ws.append(proj.packed.get(weight, sources) if md in (PACKED, PACKED_FP32) else weight)
            bs.append(bias)
            tensors.extend(t for t in (*sources, bias) if t is not None)
            return True

        for i, layer in enumerate(m.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            f, g = attn._fused_qkv, mlp._fused_gate_up
            qn, kn = (attn.q_norm, attn.k_norm) if attn.qk_norm else (None, None)
            if attn.qk_norm and not (type(qn) is RMSNorm and type(kn) is RMSNorm and qn.eps == kn.eps == p.eps
                                     and qn.weight.dtype == kn.weight.dtype == act):
                return None
            if not (type(n1) is RMSNorm and type(n2) is RMSNorm and n1.eps == n2.eps == p.eps
                    and n1.weight.dtype == n2.weight.dtype == act
                    and mlp.gated and mlp.act is F.silu and type(attn.o_proj) is Linear and type(mlp.down_proj) is Linear
                    and type(f) is FusedLinears and type(g) is FusedLinears and f.intact() and g.intact()):
                return None
            o, d = attn.o_proj, mlp.down_proj
            if not (add(f, f.weight, f.bias, tuple(x.weight for x in f.mods), p.qkv, p.qkv_b)
                    and add(o, o.weight, o.bias, (o.weight,), p.o, p.o_b)
                    and add(g, g.weight, g.bias, tuple(x.weight for x in g.mods), p.gu, p.gu_b)
                    and add(d, d.weight, d.bias, (d.weight,), p.down, p.down_b)):
                return None
            p.in_norm.append(n1.weight)
            p.post_norm.append(n2.weight)
            tensors += [n1.weight, n2.weight]
            if qn is not None:
                p.q_norm.append(qn.weight)
                p.k_norm.append(kn.weight)
                tensors += [qn.weight, kn.weight]
                mods += [(attn, "q_norm", qn), (attn, "k_norm", kn)]
            mods += [(m.model.layers, str(i), layer), (layer, "self_attn", attn), (layer, "mlp", mlp),
                     (layer, "input_layernorm", n1), (layer, "post_attention_layernorm", n2), (attn, "o_proj", o),
                     (mlp, "down_proj", d), (attn, "_fused_qkv", f), (mlp, "_fused_gate_up", g)]
            mods += [(fl.owner, n, x) for fl in (f, g) for n, x in zip(fl.names, fl.mods)]  # q/k/v, gate/up
        if p.q_norm and len(p.q_norm) != len(p.in_norm):  # q/k norms in some layers only
            return None
        return p

    @torch.no_grad()
    def run(self, p: DecodePlan, tokens: torch.Tensor, positions: torch.Tensor, k_cache: list[torch.Tensor],
            v_cache: list[torch.Tensor], slots: torch.Tensor, block_tables: torch.Tensor,
            ctx_lens: torch.Tensor) -> torch.Tensor:
        """tokens, positions (S,): one new token per sequence -> final-norm hidden states (S, C)."""
        m, cfg = self.model, self.model.config
        x = m.model.embed_tokens(tokens)  # (S, C)
        cos, sin = m.rotary(positions, x.dtype)  # (S, head_dim) each
        self.steps += 1
        return cpu_kernels.decode_layers(
            x, cos.contiguous(), sin.contiguous(), p.in_norm, p.post_norm, p.final_norm, p.q_norm, p.k_norm, p.qkv,
            p.qkv_b, p.o, p.o_b,
            p.gu, p.gu_b, p.down, p.down_b, p.mode, k_cache, v_cache, slots, block_tables, ctx_lens,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, p.eps, cfg.head_dim ** -0.5, cfg.sliding_window or 0)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None = None, bf16_linears: bool = False) -> None:
        """bf16_linears: an fp32 model's linear layers run in bf16 (packed bf16 roundings of the live
        fp32 weights); pass kv_dtype=bf16 with it to also keep K/V (and run attention) in bf16. The
        rest of the forward stays fp32."""
        self.model = model
        fuse_projections(model)  # q/k/v and gate/up as one matmul each while decoding (same Parameters)
        if model.dtype == torch.bfloat16 and model.device.type == "cpu":
            pack_weights(model)  # oneDNN-blocked bf16 copies: decode streams them ~1.7x faster
        elif bf16_linears:
            if not (bf16_packing_supported() and model.device.type == "cpu" and model.dtype == torch.float32):
                raise ValueError("bf16 linears over an fp32 model need oneDNN's native bf16 path (a CPU with "
                                 f"AVX512-BF16 / AMX) and an fp32 model on CPU (this one: {model.dtype} on "
                                 f"{model.device.type}); run the engine in the model's dtype")
            pack_weights(model, from_fp32=True)
        cfg = model.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_dtype = kv_dtype or model.dtype
        self.device = model.device
        self.use_kernel = cpu_kernels.supports(self.kv_dtype, self.device) and cpu_kernels.load() is not None
        # pure-decode steps: every layer in one C++ call when the model allows (see CppDecode)
        self.cpp_decode = CppDecode(model) if self.use_kernel else None
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(cfg.num_layers)]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers) before the forward writes into them."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[dst] = kc[src]
            vc[dst] = vc[src]

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        pos = torch.arange(start, end)
        bt = torch.tensor(block_table, dtype=torch.long)
        return bt[pos // bs] * bs + pos % bs

    @torch.no_grad()
    def execute(self, token_ids: list[list[int]], starts: list[int], block_tables: list[list[int]],
                sample_mask: list[bool], capture: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Run one step.

        For sequence i compute tokens token_ids[i] at positions starts[i].. (its earlier tokens are in
        the pool already, reachable through block_tables[i]). Sequences must be ordered decodes
        (one token) first. Returns logits (num sampled sequences, V) in the model's dtype for the
        sequences with sample_mask[i], in order. For each key i of `capture`, capture[i] is set to the
        final hidden states (len(token_ids[i]), D) of sequence i (prompt log-probs are scored from them)."""
        bs = self.block_size
        flat_tokens: list[int] = []
        positions: list[int] = []
        slot_list: list[torch.Tensor] = []
        nd = 0
        while nd < len(token_ids) and len(token_ids[nd]) == 1:
            nd += 1
        # decodes: scalar arithmetic is cheaper than tensor ops for one token each
        dec_groups: list[DecodeGroup] = []
        if nd:
            dec_slot_vals = []
            for i in range(nd):
                p = starts[i]
                flat_tokens.append(token_ids[i][0])
                positions.append(p)
                dec_slot_vals.append(block_tables[i][p // bs] * bs + p % bs)
            slot_list.append(torch.tensor(dec_slot_vals, dtype=torch.long))
            groups = [list(range(nd))] if self.use_kernel else group_by_length([starts[i] + 1 for i in range(nd)])
            if len(groups) == 1:
                groups = [list(range(nd))]  # keep the decodes' own order: no row scatter needed
            for idx in groups:
                nblk = max(len(block_tables[i]) for i in idx)
                bt = torch.tensor([block_tables[i] + [0] * (nblk - len(block_tables[i])) for i in idx], dtype=torch.long)
                ctx = torch.tensor([starts[i] + 1 for i in idx], dtype=torch.long)
                rows = None if len(groups) == 1 else torch.tensor(idx, dtype=torch.long, device=self.device)
                dec_groups.append(DecodeGroup(rows, bt.to(self.device), ctx.to(self.device)))
        prefills = []
        last_index: list[int] = []
        for i in range(nd):
            last_index.append(i)
        for i in range(nd, len(token_ids)):
            ids, s = token_ids[i], starts[i]
            n = len(ids)
            row_start = len(flat_tokens)
            flat_tokens.extend(ids)
            positions.extend(range(s, s + n))
            slot_list.append(self._slots(block_tables[i], s, s + n))
            ctx_blocks = None
            if s:
                ctx_blocks = torch.tensor(block_tables[i][: -(-(s + n) // bs)], dtype=torch.long, device=self.device)
            prefills.append((row_start, n, s, ctx_blocks))
            last_index.append(row_start + n - 1)
        tokens = torch.tensor(flat_tokens, dtype=torch.long, device=self.device)[None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[None]
        slots = torch.cat(slot_list).to(self.device)
        plan = self.cpp_decode.plan() if self.use_kernel and self.cpp_decode and nd == len(token_ids) else None
        hidden = None
        if plan is not None:
            g = dec_groups[0]
            try:
                hidden = self.cpp_decode.run(plan, tokens[0], pos[0], self.k_cache, self.v_cache, slots, g.blocks,
                                             g.ctx_lens)[None]  # (1, T, D)
            except RuntimeError as e:  # a case the C++ loop does not handle: the eager forward, from now on
                logger.warning("C++ decode step failed (%s); running the eager forward from now on",
                               str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__)
                self.cpp_decode = None
        if hidden is None:  # rewrites any K/V the failed call wrote: same values, same slots
            meta = PagedMeta(self.k_cache, self.v_cache, slots, nd, dec_groups, prefills, self.kv_dtype,
                             kernel=self.use_kernel)
            hidden = self.model(tokens, pos, meta=meta)  # (1, T, D)
        for i in capture or ():
            end = last_index[i] + 1
            capture[i] = hidden[0, end - len(token_ids[i]):end]  # (n_i, D)
        rows = [last_index[i] for i in range(len(token_ids)) if sample_mask[i]]
        if not rows:
            return torch.empty(0, self.model.config.vocab_size)
        h = hidden[0, torch.tensor(rows, device=self.device)]  # (N, D)
        return self.model.compute_logits(h)  # model dtype: the sampler upcasts only what needs fp32
