"""`ContextParallel`: attention over a sequence sharded across the ranks of a process group.

    from attncc.distributed import ContextParallel
    cp = ContextParallel(kern, group=None, balance="auto")   # kern from attncc.compile(...)
    q_l, k_l, v_l = cp.shard(q), cp.shard(k), cp.shard(v)   # global [B, H, L, D] -> my part
    out_l = cp(q_l, k_l, v_l, **inputs)                      # my output rows (differentiable)
    out = cp.unshard(out_l)                                  # all-gather back to global order
    plan = cp.plan(q_len, kv_len)                            # what each rank computes, fetches

A call posts the exchange of exactly the key rows the plan lists (`attncc.distributed.plan`),
computes this rank's rows against its own keys while they travel, then against the fetched
keys, with the mask at global positions, and merges the two by log-sum-exp
(`attncc.distributed.attention`). Backward sends the fetched rows' dK/dV back to the
owners, which sum them: every rank ends with its shards of dq, dk, dv.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..ir.inputs import InputError, check_qkv
from . import layout as lay
from .attention import finish, merge, partial_attention
from .exchange import Routes, Traffic, fetch
from .plan import Plan, PlanError, document_ids, layouts_for, make_plan
from .visits import reads_inputs

_TAG = "_attncc_cp_shard"


class ContextParallel:
    """Context-parallel attention for `kern` (an `attncc.compile(...)` Kernel) over `group`
    (a torch.distributed process group; None = the default group, or a single process when
    torch.distributed is not initialized).

    balance   "auto" (the layout with the lowest max load, then fewest bytes, among
              contiguous, headtail, grid for grid layouts and document when document ids
              are given to `shard`), or one of "contiguous", "headtail", "document", "grid".

    The layout of a length is fixed by `shard`: the first `shard` of a tensor of length L
    (or one given the document ids, e.g. `cp.shard(q, doc=doc)`, which re-plans for those
    documents) sets it; `cp(...)` and `unshard` use it. Every rank must run the same calls.
    """

    def __init__(self, kern, group=None, balance: str = "auto"):
        if not hasattr(kern, "pattern") or not hasattr(kern, "schedule"):
            raise TypeError(f"kern must be an attncc Kernel (attncc.compile(...)), got "
                            f"{type(kern).__name__}")
        if balance != "auto" and balance not in lay.BALANCES:
            raise ValueError(f"balance must be 'auto' or one of {', '.join(lay.BALANCES)}, "
                             f"got {balance!r}")
        self.kern = kern
        self.pattern = kern.pattern
        self.group = group
        self.balance = balance
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        elif group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not "
                               "initialized (call dist.init_process_group first)")
        else:
            self.rank, self.world_size = 0, 1
        self._layouts: dict[int, lay.Layout] = {}
        self._plans: dict = {}
        self.traffic = Traffic()
        self.last_plan: Optional[Plan] = None

    def __repr__(self) -> str:
        return (f"ContextParallel({self.pattern.name}, rank {self.rank}/{self.world_size}, "
                f"balance={self.balance!r})")

    # ---- layouts ----------------------------------------------------------------------------
    def layout(self, length: int, **inputs) -> lay.Layout:
        """The layout used for sequences of `length` tokens (chosen now if not yet set)."""
        doc = document_ids(self.pattern, inputs)
        if doc is None and length in self._layouts:
            return self._layouts[length]
        if doc is not None:
            doc = self._global_input_tensor(doc, length, "document ids")
        kind = self.balance
        if kind == "document" and doc is None:
            raise PlanError("balance='document' needs the document ids: pass them to shard "
                            "(e.g. cp.shard(q, doc=doc))")
        if kind in ("auto", "grid"):
            if self.world_size == 1:
                chosen = lay.contiguous(length, 1)
            else:
                ins = None if doc is None else self._doc_inputs(doc)
                if ins is None and reads_inputs(self.pattern):
                    chosen = self._static_auto(length)
                else:
                    chosen = make_plan(self.kern, length, length, world=self.world_size,
                                       balance=kind, inputs=ins, exact_limit=0).q_layout
        else:
            ins = None if doc is None else self._doc_inputs(doc)
            chosen = layouts_for(self.kern, length, length, self.world_size, kind, ins)[0][0]
        self._layouts[length] = chosen
        return chosen

    def _doc_inputs(self, doc: torch.Tensor) -> dict:
        from ..runtime.conjuncts import conjuncts, document_input
        for term in conjuncts(self.pattern.mask):
            name = document_input(term)
            if name is not None:
                return {name: doc}
        return {}

    def _static_auto(self, length: int) -> lay.Layout:
        # Without document ids a document pattern's balance is chosen as for its static part
        # (causal): head-tail.
        return lay.headtail(length, self.world_size)

    def _global_input_tensor(self, t, length: int, label: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InputError(f"{label} must be a [batch, length] tensor")
        if t.shape[1] != length:
            raise InputError(f"{label} cover {t.shape[1]} tokens but the sequence has {length}: "
                             "pass the global (unsharded) ids to shard")
        return t

    # ---- shard / unshard --------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: Optional[int] = None, **inputs) -> torch.Tensor:
        """This rank's part of the global tensor `x` along `dim` (default: 2 for 4-D
        [B, H, L, D] tensors, the last dimension otherwise, e.g. document ids [B, L]).
        `inputs` (global document ids) choose a per-document layout for this length."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"shard expects a torch.Tensor, got {type(x).__name__}")
        if getattr(x, _TAG, None) is not None:
            raise InputError(f"this tensor is already a shard (rank {self.rank} of "
                             f"{self.world_size}, from a {getattr(x, _TAG)}-token sequence): "
                             "shard the global tensor once")
        dim = self._dim(x, dim)
        length = x.shape[dim]
        layout = self.layout(length, **inputs)
        idx = layout.owned[self.rank].to(x.device)
        out = x.index_select(dim, idx)
        setattr(out, _TAG, length)
        return out

    @staticmethod
    def _dim(x: torch.Tensor, dim: Optional[int]) -> int:
        if dim is None:
            dim = 2 if x.dim() == 4 else x.dim() - 1
        if not -x.dim() <= dim < x.dim():
            raise InputError(f"dim={dim} is out of range for a {x.dim()}-D tensor")
        return dim % x.dim()

    def unshard(self, x_l: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
        """All-gather shards (this rank's `x_l`) back to the global tensor in global order
        (not differentiable)."""
        dim = self._dim(x_l, dim)
        sizes = self._gather_ints([x_l.shape[dim]], x_l.device)[:, 0].tolist()
        length = sum(sizes)
        layout = self._layouts.get(length)
        if layout is None or layout.sizes() != sizes:
            raise InputError(f"unshard: the ranks hold {sizes} rows along dim {dim}, which is "
                             "not a layout set by shard for this ContextParallel")
        if self.world_size == 1:
            return x_l.clone()
        m = max(sizes)
        pad = list(x_l.shape)
        pad[dim] = m - x_l.shape[dim]
        buf = torch.cat([x_l.detach(), x_l.new_zeros(pad)], dim).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf, group=self.group)
        shape = list(x_l.shape)
        shape[dim] = length
        out = x_l.new_empty(shape)
        for r, part in enumerate(parts):
            out.index_copy_(dim, layout.owned[r].to(x_l.device),
                            part.narrow(dim, 0, sizes[r]))
        return out

    def _gather_ints(self, values: list[int], device) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64, device=self._comm_device(device))
        if self.world_size == 1:
            return t[None].cpu()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts).cpu()

    def _comm_device(self, device) -> torch.device:
        if self.world_size > 1 and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(device)

    # ---- plan -------------------------------------------------------------------------------
    def plan(self, q_len: int, kv_len: Optional[int] = None, *, world_size: Optional[int] = None,
             heads: int = 1, kv_heads: Optional[int] = None, batch: int = 1, head_dim: int = 128,
             v_dim: Optional[int] = None, dtype: torch.dtype = torch.bfloat16, inputs=None,
             exact: Optional[bool] = None) -> Plan:
        """The plan for `q_len` queries and `kv_len` keys over this group (or `world_size`
        ranks: the simulation mode, no processes): per rank the query rows owned, the key
        ranges fetched from each other rank, bytes moved and kept pairs (its load). See
        `attncc.distributed.plan.make_plan` for the arguments."""
        return make_plan(self.kern, q_len, kv_len, world=world_size or self.world_size,
                         balance=self.balance, heads=heads, kv_heads=kv_heads, batch=batch,
                         head_dim=head_dim, v_dim=v_dim, dtype=dtype, inputs=inputs, exact=exact)

    # ---- call -------------------------------------------------------------------------------
    def __call__(self, q_l: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor, *,
                 scale: Optional[float] = None, return_lse: bool = False, **inputs):
        """This rank's output rows out_l [B, Hq, n_r, Dv] (q's dtype) from its shards q_l
        [B, Hq, n_r, D], k_l [B, Hkv, m_r, D], v_l [B, Hkv, m_r, Dv] (from `shard`).
        Runtime inputs (document ids [B, L]) may be global or this rank's shard. With
        return_lse=True also the log-sum-exp float32 [B, Hq, n_r]. Differentiable in q_l,
        k_l, v_l (every rank must run the backward pass: it exchanges dK/dV)."""
        B, Hq, Hkv, n, m, D, Dv = check_qkv(q_l, k_l, v_l)
        info = self._gather_ints([B, Hq, Hkv, D, Dv, n, m], q_l.device)
        for j, label in enumerate(("batch", "query heads", "kv heads", "head_dim", "v head_dim")):
            col = info[:, j].tolist()
            if len(set(col)) != 1:
                raise InputError(f"{label} differ across the group's ranks: {col} (rank order); "
                                 "every rank must pass the same [B, H, :, D] shapes")
        rows, keys = info[:, 5].tolist(), info[:, 6].tolist()
        q_len, kv_len = sum(rows), sum(keys)
        ql = self._call_layout(q_len, rows, "q_l", "queries")
        kl = self._call_layout(kv_len, keys, "k_l", "keys")
        inputs = self._global_inputs(inputs, q_len, kv_len, ql, kl, B)
        plan = self._call_plan(ql, kl, B, Hq, Hkv, D, Dv, k_l.dtype, inputs)
        routes = self._routes(plan, kl)
        pending = routes.start(k_l, v_l)          # the transfer overlaps the local part
        scale = scale if scale is not None else self.kern.options.scale
        q_pos = ql.owned[self.rank]
        common = dict(q_len=q_len, kv_len=kv_len, inputs=inputs, scale=scale)
        parts = [partial_attention(self.pattern, q_l, k_l, v_l, q_pos, kl.owned[self.rank],
                                   **common)]
        k_f, v_f = fetch(routes, k_l, v_l, pending)
        if k_f.shape[2]:
            me = plan.ranks[self.rank]
            k_pos = torch.cat([me.fetch_positions(s) for s, _ in routes.recv])
            parts.append(partial_attention(self.pattern, q_l, k_f, v_f, q_pos, k_pos, **common))
        out, lse = merge(parts)
        if not k_f.shape[2] and out.requires_grad:
            # keep the exchange in the graph: this rank's backward must still run it to send
            # nothing and to receive the dK/dV of the rows its peers fetched
            out = out + (k_f.sum() + v_f.sum()).to(out.dtype)
        return finish(self.pattern, out, lse, q_pos, dtype=q_l.dtype, q_len=q_len,
                      kv_len=kv_len, inputs=inputs, return_lse=return_lse)

    def _call_layout(self, length: int, sizes: list[int], arg: str, what: str) -> lay.Layout:
        layout = self._layouts.get(length)
        if layout is None and self.world_size == 1:
            layout = self.layout(length)
        if layout is None:
            raise InputError(
                f"{arg}: the ranks hold {sizes} {what}, a {length}-token sequence that no "
                "cp.shard(...) of this ContextParallel produced: pass each rank's "
                "cp.shard(...) of the global tensor")
        if layout.sizes() != sizes:
            raise InputError(
                f"{arg} holds {sizes[self.rank]} {what} on rank {self.rank}, but the "
                f"{layout.kind} layout of the {length}-token sequence over {self.world_size} "
                f"ranks gives {layout.sizes()} (ranks hold {sizes}): pass each rank's "
                "cp.shard(...) of the global tensor")
        return layout

    def _global_inputs(self, inputs: dict, q_len, kv_len, ql, kl, B) -> dict:
        out = {}
        declared = {d.name: d for d in self.pattern.inputs}
        for name, t in inputs.items():
            if name not in declared:
                raise InputError(f"unknown input '{name}' for pattern '{self.pattern.name}' "
                                 f"(declared: {', '.join(declared) or 'none'})")
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input '{name}' must be a tensor")
            sides = [str(i) for i in getattr(declared[name], "dims", ())]
            out[name] = self._as_global(name, t, sides, q_len, kv_len, ql, kl)
        return out

    def _as_global(self, name, t, sides, q_len, kv_len, ql, kl):
        for d, side in enumerate(sides):
            if side not in ("q", "k"):
                continue
            full, layout = (q_len, ql) if side == "q" else (kv_len, kl)
            local = layout.sizes()[self.rank]
            if t.shape[d] == full:
                continue
            if t.shape[d] != local:
                raise InputError(f"input '{name}' has {t.shape[d]} entries along dim {d}; "
                                 f"expected the global {full} or this rank's {local}")
            t = self._unshard_with(t, d, layout)
        return t

    def _unshard_with(self, t, dim, layout):
        if self.world_size == 1:
            return t
        sizes = layout.sizes()
        m = max(sizes)
        pad = list(t.shape)
        pad[dim] = m - t.shape[dim]
        buf = torch.cat([t, t.new_zeros(pad)], dim).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf, group=self.group)
        shape = list(t.shape)
        shape[dim] = layout.length
        out = t.new_empty(shape)
        for r, part in enumerate(parts):
            out.index_copy_(dim, layout.owned[r].to(t.device), part.narrow(dim, 0, sizes[r]))
        return out

    def _call_plan(self, ql, kl, B, Hq, Hkv, D, Dv, dtype, inputs) -> Plan:
        dynamic = reads_inputs(self.pattern)
        key = (id(ql), id(kl), B, Hq, Hkv, D, Dv, dtype)
        plan = None if dynamic else self._plans.get(key)
        if plan is None:
            plan = make_plan(self.kern, ql.length, kl.length, world=self.world_size,
                             heads=Hq, kv_heads=Hkv, batch=B, head_dim=D, v_dim=Dv,
                             dtype=dtype, inputs=inputs if dynamic else None, exact=True,
                             layouts=(ql, kl), exact_limit=0)
            if not dynamic:
                self._plans = {key: plan}
        self.last_plan = plan
        return plan

    def _routes(self, plan: Plan, kl: lay.Layout) -> Routes:
        send = {}
        for rp in plan.ranks:
            if rp.rank == self.rank:
                continue
            pos = rp.fetch_positions(self.rank)
            if pos.numel():
                send[rp.rank] = kl.local_index(self.rank, pos)
        me = plan.ranks[self.rank]
        srcs = sorted(set(me.fetch_src.tolist()))
        recv = [(s, int(me.fetch_positions(s).numel())) for s in srcs]
        return Routes(self.rank, self.group, send, recv, self.traffic)


__all__ = ["ContextParallel"]
