# attncc forward attention kernel (generated source; edit the pattern, not this file).
# pattern: natten2d   IR hash: 7bb1eb9e20cf19ea
# options: block_m=16 block_n=16 num_warps=4 num_stages=2
# query tiles: 4x4 over grid 8x12
# key tiles:   4x4 over grid 8x12
# key-tile lists: CSR rows per (head class, query tile), FULL and PARTIAL.
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["ROWS_PER_BATCH", "Q_LEN", "KV_LEN", "HEADS", "GROUP", "N_Q_TILES"])
def attncc_fwd_natten2d_87053c375627(
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
    q_slot = tl.arange(0, BLOCK_M)
    qs0 = (q_slot // 4) % 4  # axis 0: 4 of 8
    qs1 = q_slot % 4  # axis 1: 4 of 12
    qc0 = (m // 3) * 4 + qs0
    qc1 = (m % 3) * 4 + qs1
    q_idx = qc0 * 12 + qc1
    q_ok = (qc0 < 8) & (qc1 < 12)
    q = q_idx[:, None]
    q_c0 = qc0[:, None]
    q_c1 = qc1[:, None]
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
    k_slot = tl.arange(0, BLOCK_N)
    ks0 = (k_slot // 4) % 4  # axis 0: 4 of 8
    ks1 = k_slot % 4  # axis 1: 4 of 12
    k_row = ks0 * 12 + ks1  # flat in-tile row of each slot
    k_offs = k_row[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_offs = k_row[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    # Loop-invariant parts of the mask and score.
    t0 = tl.minimum(tl.maximum(q_c0 - 1, 0), 5)  # min(max(q.y - 1, 0), 5)
    t1 = t0 + 3  # min(max(q.y - 1, 0), 5) + 3
    t2 = tl.minimum(tl.maximum(q_c1 - 1, 0), 9)  # min(max(q.x - 1, 0), 9)
    t3 = t2 + 3  # min(max(q.x - 1, 0), 9) + 3
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # CSR row of this program: (head class of h [+ batch b], query tile m).
    row = (tl.load(HEAD_CLASS + h) + b * ROWS_PER_BATCH) * N_Q_TILES + m
    lo_full = tl.load(FULL_OFFSETS + row)
    hi_full = tl.load(FULL_OFFSETS + row + 1)
    lo_partial = tl.load(PARTIAL_OFFSETS + row)
    hi_partial = tl.load(PARTIAL_OFFSETS + row + 1)
    # FULL key tiles: every pair kept; no per-element masks (key tail: see n_tail).
    for it in range(lo_full, hi_full):
        n = tl.load(FULL_INDICES + it)
        kc0 = (n // 3) * 4 + ks0
        kc1 = (n % 3) * 4 + ks1
        k_idx = kc0 * 12 + kc1
        k = k_idx[None, :]
        k_c0 = kc0[None, :]
        k_c1 = kc1[None, :]
        k_blk = tl.load(k_base + (tl.cast((n // 3) * 4, tl.int64) * 12 + tl.cast((n % 3) * 4, tl.int64)) * stride_kn + k_offs,
                        mask=(offs_d[:, None] < HEAD_DIM), other=0.0)
        v_blk = tl.load(v_base + (tl.cast((n // 3) * 4, tl.int64) * 12 + tl.cast((n % 3) * 4, tl.int64)) * stride_vn + v_offs,
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
    for it in range(lo_partial, hi_partial):
        n = tl.load(PARTIAL_INDICES + it)
        kc0 = (n // 3) * 4 + ks0
        kc1 = (n % 3) * 4 + ks1
        k_idx = kc0 * 12 + kc1
        k_ok = (kc0 < 8) & (kc1 < 12)
        k = k_idx[None, :]
        k_c0 = kc0[None, :]
        k_c1 = kc1[None, :]
        k_blk = tl.load(k_base + (tl.cast((n // 3) * 4, tl.int64) * 12 + tl.cast((n % 3) * 4, tl.int64)) * stride_kn + k_offs,
                        mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v_blk = tl.load(v_base + (tl.cast((n // 3) * 4, tl.int64) * 12 + tl.cast((n % 3) * 4, tl.int64)) * stride_vn + v_offs,
                        mask=k_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if DOT_FP32:
            k_blk = k_blk.to(tl.float32)
        x = tl.dot(q_blk, k_blk)
        keep = k_ok[None, :] & (((t0 <= k_c0) & (k_c0 < t1)) & ((t2 <= k_c1) & (k_c1 < t3)))
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
        for it in tl.range(lo_full, hi_full, 1, num_stages=1):
            n = tl.load(FULL_INDICES + it)
            kc0 = (n // 3) * 4 + ks0
            kc1 = (n % 3) * 4 + ks1
            k_idx = kc0 * 12 + kc1
            k = k_idx[None, :]
            k_c0 = kc0[None, :]
            k_c1 = kc1[None, :]
            k_blk = tl.load(k_base + (tl.cast((n // 3) * 4, tl.int64) * 12 + tl.cast((n % 3) * 4, tl.int64)) * stride_kn + k_offs,
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
        for it in tl.range(lo_partial, hi_partial, 1, num_stages=1):
            n = tl.load(PARTIAL_INDICES + it)
            kc0 = (n // 3) * 4 + ks0
            kc1 = (n % 3) * 4 + ks1
            k_idx = kc0 * 12 + kc1
            k_ok = (kc0 < 8) & (kc1 < 12)
            k = k_idx[None, :]
            k_c0 = kc0[None, :]
            k_c1 = kc1[None, :]
            k_blk = tl.load(k_base + (tl.cast((n // 3) * 4, tl.int64) * 12 + tl.cast((n % 3) * 4, tl.int64)) * stride_kn + k_offs,
                            mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            if DOT_FP32:
                k_blk = k_blk.to(tl.float32)
            x = tl.dot(q_blk, k_blk)
            keep = k_ok[None, :] & (((t0 <= k_c0) & (k_c0 < t1)) & ((t2 <= k_c1) & (k_c1 < t3)))
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


KERNEL = attncc_fwd_natten2d_87053c375627
META = {'kernel': 'attncc_fwd_natten2d_87053c375627', 'block_m': 16, 'block_n': 16, 'q_tile': (4, 4), 'kv_tile': (4, 4), 'q_grid': (8, 12), 'kv_grid': (8, 12), 'inputs': (), 'input_dims': (), 'num_warps': 4, 'num_stages': 2, 'closed_form': False}
