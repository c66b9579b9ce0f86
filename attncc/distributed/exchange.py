"""The K/V exchange of a context-parallel call over torch.distributed point-to-point calls.

Every rank knows the whole plan (it is a pure function of the shapes, the balance and the
document ids), so each rank posts exactly the receives matching its peers' sends. One message
per (sender, receiver) pair carries that pair's K rows then V rows, flattened. The backward
pass sends the gradients of the fetched rows back to their owners, which sum them into dK/dV.
The forward exchange is posted (`Routes.start`) before the rank's work on its own keys and
waited for after it, so the transfer overlaps that compute.

`_Fetch` is the autograd Function around the exchange; `Traffic` counts the bytes handed to
`isend` (what the tests compare with the plan).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Bytes and messages handed to the communication calls on this rank."""
    forward_sent: int = 0
    forward_received: int = 0
    backward_sent: int = 0
    backward_received: int = 0
    messages: list = field(default_factory=list)  # (direction, peer, bytes)

    def reset(self) -> None:
        self.forward_sent = self.forward_received = 0
        self.backward_sent = self.backward_received = 0
        self.messages.clear()


@dataclass(frozen=True, eq=False)
class Routes:
    """This rank's side of the plan.

    send     {peer: int64 local indices of my keys that peer fetches}
    recv     [(peer, n tokens)] in the order fetched rows are concatenated
    """
    rank: int
    group: object
    send: dict
    recv: list
    traffic: Traffic

    def _peer(self, rank: int) -> int:
        """Global rank of group rank `rank` (what isend/irecv expect)."""
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def _post(self, outgoing: dict, incoming: dict, direction: str) -> list:
        """Post receives then sends (outgoing/incoming: {peer: flat tensor}); returns the
        pending works. Counts bytes as they are handed to isend / irecv."""
        works = []
        for peer, buf in incoming.items():
            works.append(dist.irecv(buf, self._peer(peer), group=self.group))
        for peer, buf in outgoing.items():
            works.append(dist.isend(buf, self._peer(peer), group=self.group))
            n = buf.numel() * buf.element_size()
            self.traffic.messages.append((direction, peer, n))
            if direction == "forward":
                self.traffic.forward_sent += n
            else:
                self.traffic.backward_sent += n
        got = sum(b.numel() * b.element_size() for b in incoming.values())
        if direction == "forward":
            self.traffic.forward_received += got
        else:
            self.traffic.backward_received += got
        return works

    def _exchange(self, outgoing: dict, incoming: dict, direction: str) -> dict:
        for w in self._post(outgoing, incoming, direction):
            w.wait()
        return incoming

    def start(self, k: torch.Tensor, v: torch.Tensor) -> "Pending":
        """Post the forward exchange of K and V rows; `Pending.finish()` waits for it (local
        work can run in between)."""
        B, H, _, D = k.shape
        Dv = v.shape[-1]
        out = {}
        with torch.no_grad():
            for peer, idx in self.send.items():
                idx = idx.to(k.device)
                out[peer] = torch.cat([k.index_select(2, idx).reshape(-1),
                                       v.index_select(2, idx).reshape(-1)])
        inc = {peer: torch.empty(B * H * n * (D + Dv), dtype=k.dtype, device=k.device)
               for peer, n in self.recv if n}
        works = self._post(out, inc, "forward")
        return Pending(self, works, out, inc, (B, H, D, Dv), k, v)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fetched K and V rows [B, Hkv, n_fetched, D(v)], peers in `recv` order."""
        return self.start(k, v).finish()

    def backward(self, dk_f: torch.Tensor, dv_f: torch.Tensor, k_shape, v_shape):
        """Send the fetched rows' gradients to their owners; sum what peers send back."""
        B, H, _, D = k_shape
        Dv = v_shape[-1]
        out, off = {}, 0
        for peer, n in self.recv:
            if not n:
                continue
            out[peer] = torch.cat([dk_f[:, :, off:off + n].reshape(-1),
                                   dv_f[:, :, off:off + n].reshape(-1)])
            off += n
        inc = {peer: torch.empty(B * H * idx.numel() * (D + Dv), dtype=dk_f.dtype,
                                 device=dk_f.device) for peer, idx in self.send.items()}
        inc = self._exchange(out, inc, "backward")
        dk = torch.zeros(k_shape, dtype=dk_f.dtype, device=dk_f.device)
        dv = torch.zeros(v_shape, dtype=dv_f.dtype, device=dv_f.device)
        for peer, idx in self.send.items():
            n = idx.numel()
            idx = idx.to(dk.device)
            buf = inc[peer]
            dk.index_add_(2, idx, buf[:B * H * n * D].view(B, H, n, D))
            dv.index_add_(2, idx, buf[B * H * n * D:].view(B, H, n, Dv))
        return dk, dv


@dataclass(eq=False)
class Pending:
    """A posted forward exchange (see `Routes.start`)."""
    routes: Routes
    works: list
    outgoing: dict
    incoming: dict
    dims: tuple
    k: torch.Tensor
    v: torch.Tensor

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        for w in self.works:
            w.wait()
        B, H, D, Dv = self.dims
        ks, vs = [], []
        for peer, n in self.routes.recv:
            if not n:
                continue
            buf = self.incoming[peer]
            ks.append(buf[:B * H * n * D].view(B, H, n, D))
            vs.append(buf[B * H * n * D:].view(B, H, n, Dv))
        if not ks:
            return self.k.new_zeros(B, H, 0, D), self.v.new_zeros(B, H, 0, Dv)
        return torch.cat(ks, 2), torch.cat(vs, 2)


class _Fetch(torch.autograd.Function):
    """(k_local, v_local) → (k_fetched, v_fetched); backward returns each owner's summed
    dK/dV for the rows other ranks fetched."""

    @staticmethod
    def forward(ctx, routes: Routes, pending, k: torch.Tensor, v: torch.Tensor):
        ctx.routes = routes
        ctx.k_shape, ctx.v_shape = tuple(k.shape), tuple(v.shape)
        return pending.finish() if pending is not None else routes.forward(k, v)

    @staticmethod
    def backward(ctx, dk_f, dv_f):
        dk, dv = ctx.routes.backward(dk_f.contiguous(), dv_f.contiguous(), ctx.k_shape,
                                     ctx.v_shape)
        return None, None, dk, dv


def fetch(routes: Routes, k: torch.Tensor, v: torch.Tensor, pending: "Pending" = None):
    """Differentiable K/V exchange (see `_Fetch`); `pending` = `routes.start(k, v)` posted
    earlier (to overlap the transfer with local work) or None to exchange now."""
    return _Fetch.apply(routes, pending, k.contiguous(), v.contiguous())
