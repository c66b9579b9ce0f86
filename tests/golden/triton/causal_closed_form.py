# attncc forward attention kernel (generated source; edit the pattern, not this file).
# pattern: causal   IR hash: cad8dd24738954b7
# options: block_m=16 block_n=16 num_warps=4 num_stages=2
# query tiles: 16 tokens
# key tiles:   16 tokens
# key-tile loops: closed-form bounds (no index arrays).
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["ROWS_PER_BATCH", "Q_LEN", "KV_LEN", "HEADS", "GROUP", "N_Q_TILES"])
def attncc_fwd_causal_13065ae5a230(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    FULL_OFFSETS, FULL_INDICES, PARTIAL_OFFSETS, PARTIAL_INDICES, HEAD_CLASS, ROWS_PER_BATCH,
    Q_LEN, KV_LEN, HEADS, GROUP, N_Q_TILES, HEAD_DIM, HEAD_DIM_V, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BS=None, BS_ROWS=None, BS_COLS=None, BS_QDIV=None, BS_KDIV=None,
    BLOCK_SCORES: tl.constexpr = 0,
):
    # One program per (query tile m, batch·head bh).
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    kv_h = h // GROUP
    # Query tile: token row of each of the BLOCK_M slots, and which slots exist.
    q_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_idx < Q_LEN
    q = q_idx[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    q_blk = tl.load(q_base + q_idx.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=q_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:  # matrix products in float32 (Triton's CPU interpreter has no bf16 dot)
        q_blk = q_blk.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # softmax runs in base 2
    offs_n = tl.arange(0, BLOCK_N)
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    # Loop-invariant parts of the mask and score.
    t0 = q + (KV_LEN - Q_LEN)  # q + (KV_LEN - Q_LEN)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Closed-form key-tile ranges of query tile m (the schedule checked them against
    # the exact tile classes: every nonempty range lies inside the key tiles).
    kt_lo_full0 = 0
    kt_hi_full0 = m
    kt_lo_partial0 = m
    kt_hi_partial0 = (m + 1)
    # Key tile n_tail reaches past KV_LEN when KV_LEN is not a multiple of BLOCK_N;
    # FULL loops stop before it and, when it is FULL, it runs (masked) with the PARTIAL tiles.
    n_tail = KV_LEN // BLOCK_N
    tail_full = (((kt_lo_full0 <= n_tail) & (n_tail < kt_hi_full0))).to(tl.int32)
    partial_end0 = tl.maximum(kt_hi_partial0 - kt_lo_partial0, 0)
    partial_end1 = partial_end0 + tail_full
    # FULL key tiles: every pair kept; no per-element masks (key tail: see n_tail).
    for n in range(kt_lo_full0, tl.minimum(kt_hi_full0, n_tail)):
        k_idx = n * BLOCK_N + offs_n
        k = k_idx[None, :]
        k_blk = tl.load(k_base + tl.cast(n, tl.int64) * BLOCK_N * stride_kn + k_offs,
                        mask=(offs_d[:, None] < HEAD_DIM), other=0.0)
        v_blk = tl.load(v_base + tl.cast(n, tl.int64) * BLOCK_N * stride_vn + v_offs,
                        mask=(offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if DOT_FP32:
            k_blk = k_blk.to(tl.float32)
        x = tl.dot(q_blk, k_blk)
        m_new = tl.maximum(m_i, tl.max(x, 1) * qk_scale)
        p = tl.exp2(x * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(V.dtype.element_ty)  # P·V in the input dtype, as flash attention does
        if DOT_FP32:
            acc = tl.dot(p.to(tl.float32), v_blk.to(tl.float32), acc)
        else:
            acc = tl.dot(p, v_blk, acc)
        m_i = m_new
    # PARTIAL key tiles: the mask predicate is evaluated per element.
    for it in range(0, partial_end1):
        n = tl.where(it < partial_end0, kt_lo_partial0 + it, n_tail + (it - partial_end0))
        k_idx = n * BLOCK_N + offs_n
        k_ok = k_idx < KV_LEN
        k = k_idx[None, :]
        k_blk = tl.load(k_base + tl.cast(n, tl.int64) * BLOCK_N * stride_kn + k_offs,
                        mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v_blk = tl.load(v_base + tl.cast(n, tl.int64) * BLOCK_N * stride_vn + v_offs,
                        mask=k_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if DOT_FP32:
            k_blk = k_blk.to(tl.float32)
        x = tl.dot(q_blk, k_blk)
        keep = k_ok[None, :] & (k <= t0)
        x = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1) * qk_scale)
        # A row with no kept key so far has m = -inf: shift by 0, not by -inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(x * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(V.dtype.element_ty)  # P·V in the input dtype, as flash attention does
        if DOT_FP32:
            acc = tl.dot(p.to(tl.float32), v_blk.to(tl.float32), acc)
        else:
            acc = tl.dot(p, v_blk, acc)
        m_i = m_new
    # Rows that saw no key output 0 and log-sum-exp -inf.
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_ok, m_i * 0.6931471805599453 + tl.log(l_safe), float("-inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + q_idx.to(tl.int64)[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    tl.store(l_base + q_idx.to(tl.int64) * stride_lm, lse, mask=q_ok)
    if BLOCK_SCORES:  # pooled probabilities (runtime/block_scores.py); compiled away when 0
        # Second pass over the same key tiles now that each row's log-sum-exp is known: QKᵀ and
        # the mask only (no P·V), P = exp2(x - lse2) pooled per tile into BS (BLOCK_SCORES 1:
        # atomic max into [B, Hq, BS_ROWS, BS_COLS]; 2: the tile's sum into its own slot).
        # Padding rows and rows without a kept key get lse2 = +inf, hence P = 0.
        lse2 = tl.where(l_ok & q_ok, m_i + tl.log2(l_safe), float("inf"))
        bs_row = BS + ((b * HEADS + h) * BS_ROWS + m // BS_QDIV).to(tl.int64) * BS_COLS
        # FULL key tiles (block scores)
        for n in tl.range(kt_lo_full0, tl.minimum(kt_hi_full0, n_tail), 1, num_stages=1):
            k_idx = n * BLOCK_N + offs_n
            k = k_idx[None, :]
            k_blk = tl.load(k_base + tl.cast(n, tl.int64) * BLOCK_N * stride_kn + k_offs,
                            mask=(offs_d[:, None] < HEAD_DIM), other=0.0)
            if DOT_FP32:
                k_blk = k_blk.to(tl.float32)
            x = tl.dot(q_blk, k_blk)
            if BLOCK_SCORES == 1:
                # max: exp2 increases, so the tile's largest P is exp2(row max - lse2) of some row;
                # one atomic max per tile (exact and order-independent; P >= 0, so the int order of
                # the bits is the float order).
                tile_p = tl.max(tl.exp2(tl.max(x, 1) * qk_scale - lse2), 0)
                tl.atomic_max(bs_row + n // BS_KDIV, tile_p.to(tl.int32, bitcast=True), sem="relaxed")
            else:
                # sum of the tile's P (0 where masked), stored in the tile's own slot: reduced in a
                # fixed order on the host
                p = tl.exp2(x * qk_scale - lse2[:, None])
                tl.store(bs_row + n // BS_KDIV, tl.sum(tl.sum(p, 1), 0))
        # PARTIAL key tiles (block scores)
        for it in tl.range(0, partial_end1, 1, num_stages=1):
            n = tl.where(it < partial_end0, kt_lo_partial0 + it, n_tail + (it - partial_end0))
            k_idx = n * BLOCK_N + offs_n
            k_ok = k_idx < KV_LEN
            k = k_idx[None, :]
            k_blk = tl.load(k_base + tl.cast(n, tl.int64) * BLOCK_N * stride_kn + k_offs,
                            mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            if DOT_FP32:
                k_blk = k_blk.to(tl.float32)
            x = tl.dot(q_blk, k_blk)
            keep = k_ok[None, :] & (k <= t0)
            x = tl.where(keep, x, float("-inf"))
            if BLOCK_SCORES == 1:
                # max: exp2 increases, so the tile's largest P is exp2(row max - lse2) of some row;
                # one atomic max per tile (exact and order-independent; P >= 0, so the int order of
                # the bits is the float order).
                tile_p = tl.max(tl.exp2(tl.max(x, 1) * qk_scale - lse2), 0)
                tl.atomic_max(bs_row + n // BS_KDIV, tile_p.to(tl.int32, bitcast=True), sem="relaxed")
            else:
                # sum of the tile's P (0 where masked), stored in the tile's own slot: reduced in a
                # fixed order on the host
                p = tl.exp2(x * qk_scale - lse2[:, None])
                tl.store(bs_row + n // BS_KDIV, tl.sum(tl.sum(p, 1), 0))


KERNEL = attncc_fwd_causal_13065ae5a230
META = {'kernel': 'attncc_fwd_causal_13065ae5a230', 'block_m': 16, 'block_n': 16, 'q_tile': (16,), 'kv_tile': (16,), 'q_grid': None, 'kv_grid': None, 'inputs': (), 'input_dims': (), 'num_warps': 4, 'num_stages': 2, 'closed_form': True}
