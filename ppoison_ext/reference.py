"""Pure-PyTorch twins of the native ops in :mod:`ppoison_ext.ops`.

Same names, signatures and semantics; vectorized over the batch (loops run only over
search iterations or memory chunks, never over samples). They are the test oracle and the
benchmark baseline. Oracle, objective and step twins compute in float64 like the kernels;
the rest compute in the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["jacobian_gram_fc", "jacobian_tvec_fc", "jacobian_gram", "jacobian_tvec", "mad_oracle",
           "mad_objective", "mad_step", "project_simplex", "project_l1_ball", "grad2_allocate",
           "modelguard_w_solve"]

VERTEX_WEIGHT = 1e-5  # up-weight of the top class in argmax-preserving vertices
GREEDY_SMOOTH = 1e-8  # y smoothing in the greedy argmax search
ALPHA_EPS = 1e-7  # denominator guard of the closed-form step
ZERO_REL = 1e-12  # ‖Gᵀa‖² below this (relative) counts as a zero vector
TIE_REL = 1e-10  # objective values this close (relative) are ties

_CHUNK = 1 << 24  # elements per chunk of the exact argmax enumeration


def jacobian_gram_fc(p: Tensor, h_sqnorm: Tensor) -> Tensor:
    K = p.shape[1]
    p2 = (p * p).sum(-1)
    eye = torch.eye(K, dtype=p.dtype, device=p.device)
    return h_sqnorm[:, None, None] * (eye - p[:, :, None] - p[:, None, :] + p2[:, None, None])


def jacobian_tvec_fc(p: Tensor, h: Tensor, y: Tensor) -> Tensor:
    c = y.sum(-1, keepdim=True) * p - y
    return (c[:, :, None] * h[:, None, :]).reshape(p.shape[0], p.shape[1] * h.shape[1])


def jacobian_gram(G: Tensor) -> Tensor:
    return torch.bmm(G, G.transpose(1, 2))


def jacobian_tvec(G: Tensor, y: Tensor) -> Tensor:
    return torch.bmm(y.unsqueeze(1), G).squeeze(1)


# ---------------------------------------------------------------------------------------
# MAD objective math (see csrc/mad_math.h)


def _angular(A: Tensor, C: Tensor, Y: Tensor, zero_a: Tensor, zero_y: Tensor) -> Tensor:
    u = A > zero_a
    v = Y > zero_y
    r = u.double() + v.double()
    denom = torch.sqrt(A.clamp(min=0)) * torch.sqrt(Y.clamp(min=0))
    both = u & v
    r = torch.where(both, r - 2.0 * C / torch.where(both, denom, torch.ones_like(denom)), r)
    return r.clamp(0.0, 4.0)


class _Gram:
    """Per-sample Gram context in float64, FC/identity or dense."""

    def __init__(self, y: Tensor, p: Optional[Tensor], h_sqnorm: Optional[Tensor], gram: Optional[Tensor]):
        self.y = y.double()
        B, K = y.shape
        self.K = K
        self.dense = gram is not None
        if self.dense:
            self.M = gram.double()
            self.my = torch.bmm(self.M, self.y.unsqueeze(-1)).squeeze(-1)
            self.yy = (self.y * self.my).sum(-1)
            trace = torch.diagonal(self.M, dim1=1, dim2=2).sum(-1)
            self.scale = trace.clamp(min=0) / K
            self.zero_y = ZERO_REL * self.scale * (self.y * self.y).sum(-1)
            self.diag = torch.diagonal(self.M, dim1=1, dim2=2)
        else:
            self.p = p.double() if p is not None else torch.zeros_like(self.y)
            self.hsq = h_sqnorm.double() if h_sqnorm is not None else torch.ones(B, dtype=torch.float64, device=y.device)
            self.sy = self.y.sum(-1)
            self.p2 = (self.p * self.p).sum(-1)
            self.wy = self.y - self.p * self.sy[:, None]
            self.pw = (self.p * self.wy).sum(-1)
            self.wy2 = (self.wy * self.wy).sum(-1)
            self.zero_y = ZERO_REL * (self.y * self.y).sum(-1)

    def value(self, A: Tensor, C: Tensor, Y: Tensor, zero_a: Tensor, objmax: bool) -> Tensor:
        """A, C, zero_a: [B, N]; Y: [B] → values [B, N]."""
        Y = Y[:, None].expand_as(A)
        if objmax:
            v = _angular(A, C, Y, zero_a, self.zero_y[:, None].expand_as(A))
        else:
            v = (A - 2.0 * C + Y).clamp(min=0)
        if not self.dense:
            hsq = self.hsq[:, None]
            v = torch.where(hsq > 0, v if objmax else hsq * v, torch.zeros_like(v))
        return v

    def singles(self, objmax: bool) -> Tensor:
        """Values of the one-hot vertices e_k: [B, K]."""
        if self.dense:
            A, C, Y = self.diag, self.my, self.yy
            zero_a = (ZERO_REL * self.scale)[:, None].expand_as(A)
        else:
            A = 1.0 - 2.0 * self.p + self.p2[:, None]
            C = self.wy - self.pw[:, None]
            Y = self.wy2
            zero_a = torch.full_like(A, ZERO_REL)
        return self.value(A, C, Y, zero_a, objmax)

    def vertices(self, n: Tensor, sums: dict, kstar: Tensor, objmax: bool) -> Tensor:
        """Values of the vertices (1_S + w e_k*)/(|S| + w), S given by its sums; [B, N]."""
        w = VERTEX_WEIGHT
        s = n + w
        aa = n + 2.0 * w + w * w
        b = torch.arange(kstar.shape[0], device=kstar.device)
        if self.dense:
            mkk = self.M[b, kstar, kstar][:, None]
            A = (sums["t"] + 2.0 * w * sums["rk"] + w * w * mkk) / (s * s)
            C = (sums["q"] + w * self.my[b, kstar][:, None]) / s
            Y = self.yy
            zero_a = ZERO_REL * self.scale[:, None] * aa / (s * s)
        else:
            ap = sums["sp"] + w * self.p[b, kstar][:, None]
            A = (aa - 2.0 * s * ap + s * s * self.p2[:, None]) / (s * s)
            C = (sums["sw"] + w * self.wy[b, kstar][:, None] - s * self.pw[:, None]) / s
            Y = self.wy2
            zero_a = ZERO_REL * aa / (s * s)
        return self.value(A, C, Y, zero_a.expand_as(A), objmax)


def _tie_scale(best: Tensor, angular: bool) -> Tensor:
    """Relative to |best|, floored at 1 for the angular objective (values in [0, 4]); purely
    relative for the surrogate, which scales with the proxy's features."""
    return best.abs().clamp(min=1.0) if angular else best.abs()


def _first_best(values: Tensor, angular: bool) -> Tuple[Tensor, Tensor]:
    """Index of the first value within the tie tolerance of the row maximum, and that value."""
    best = values.max(dim=-1).values
    tol = TIE_REL * _tie_scale(best, angular)
    ok = values >= (best - tol)[..., None]
    idx = ok.to(torch.uint8).argmax(dim=-1)  # first True
    return idx, values.gather(-1, idx[..., None]).squeeze(-1)


def _vertex_from_mask(mask: Tensor, kstar: Tensor, dtype: torch.dtype) -> Tensor:
    w = VERTEX_WEIGHT
    n = mask.sum(-1, keepdim=True).double()
    out = mask.double()
    out[torch.arange(mask.shape[0], device=mask.device), kstar] = 1.0 + w
    return (out / (n + w)).to(dtype)


def _free_bits(K: int, device) -> Tensor:
    """[2^(K−1), K−1] rows of the binary ranks, most significant bit first (itertools order)."""
    nfree = K - 1
    r = torch.arange(1 << nfree, device=device)
    shifts = torch.arange(nfree - 1, -1, -1, device=device)
    return ((r[:, None] >> shifts[None, :]) & 1).double()


def _free_cols(kstar: Tensor, K: int) -> Tensor:
    """[B, K−1] class index of each free bit: all classes but k*, ascending."""
    j = torch.arange(K - 1, device=kstar.device)[None, :]
    return j + (j >= kstar[:, None]).long()


def _argmax_exact(g: _Gram, kstar: Tensor, objmax: bool) -> Tuple[Tensor, Tensor]:
    B, K = g.y.shape
    F = _free_bits(K, g.y.device)  # [R, K-1]
    R = F.shape[0]
    cols = _free_cols(kstar, K)  # [B, K-1]
    b = torch.arange(B, device=g.y.device)
    n = 1.0 + F.sum(-1)[None, :]  # [1, R]
    best_v = torch.empty(B, dtype=torch.float64, device=g.y.device)
    best_r = torch.empty(B, dtype=torch.long, device=g.y.device)
    chunk = max(1, _CHUNK // (R * K))
    for lo in range(0, B, chunk):
        sl = slice(lo, lo + chunk)
        bs, ks, cs = b[sl], kstar[sl], cols[sl]
        if g.dense:
            M = g.M[sl]
            Mff = M.gather(1, cs[:, :, None].expand(-1, -1, K)).gather(2, cs[:, None, :].expand(-1, K - 1, -1))
            Mkf = M[torch.arange(len(bs)), ks].gather(1, cs)  # [b, K-1]
            mkk = M[torch.arange(len(bs)), ks, ks]
            quad = torch.einsum("rf,bfg,rg->br", F, Mff, F)
            sums = {
                "t": mkk[:, None] + 2.0 * Mkf @ F.T + quad,
                "rk": mkk[:, None] + Mkf @ F.T,
                "q": g.my[bs, ks][:, None] + g.my[bs].gather(1, cs) @ F.T,
            }
        else:
            sums = {
                "sp": g.p[bs, ks][:, None] + g.p[bs].gather(1, cs) @ F.T,
                "sw": g.wy[bs, ks][:, None] + g.wy[bs].gather(1, cs) @ F.T,
            }
        sub = _Gram.__new__(_Gram)
        sub.__dict__ = {k: (v[sl] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v)
                        for k, v in g.__dict__.items()}
        vals = sub.vertices(n.expand(len(bs), R), sums, ks, objmax)
        best_r[sl], best_v[sl] = _first_best(vals, objmax)
    mask = torch.zeros(B, K, dtype=torch.bool, device=g.y.device)
    mask[b, kstar] = True
    bits = F[best_r].bool()  # [B, K-1]
    mask.scatter_(1, cols, bits | mask.gather(1, cols))
    return mask, best_v


def _argmax_greedy(g: _Gram, kstar: Tensor, max_candidates: int) -> Tuple[Tensor, Tensor]:
    B, K = g.y.shape
    dev = g.y.device
    b = torch.arange(B, device=dev)
    in_set = torch.zeros(B, K, dtype=torch.bool, device=dev)
    in_set[b, kstar] = True
    n = torch.ones(B, 1, dtype=torch.float64, device=dev)
    if g.dense:
        r = g.M[b, :, kstar].clone()  # M 1_S, S = {k*}
        t = g.M[b, kstar, kstar][:, None].clone()
        q = g.my[b, kstar][:, None].clone()
    else:
        sp = g.p[b, kstar][:, None].clone()
        sw = g.wy[b, kstar][:, None].clone()
    best = torch.full((B,), -1.0, dtype=torch.float64, device=dev)
    best_mask = in_set.clone()
    scored = 0
    size = 1
    while scored < max_candidates and size < K:
        if g.dense:
            diag = g.diag
            sums = {"t": t + 2.0 * r + diag, "rk": r[b, kstar][:, None] + g.M[b, kstar, :], "q": q + g.my}
        else:
            sums = {"sp": sp + g.p, "sw": sw + g.wy}
        vals = g.vertices(n + 1.0, sums, kstar, True)
        vals = vals.masked_fill(in_set, float("-inf"))
        c, v = _first_best(vals, True)
        better = v > best + TIE_REL * _tie_scale(best, True)
        best = torch.where(better, v, best)
        new_mask = in_set.clone()
        new_mask[b, c] = True
        best_mask = torch.where(better[:, None], new_mask, best_mask)
        in_set = new_mask
        if g.dense:
            t = t + 2.0 * r[b, c][:, None] + g.M[b, c, c][:, None]
            r = r + g.M[b, :, c]
            q = q + g.my[b, c][:, None]
        else:
            sp = sp + g.p[b, c][:, None]
            sw = sw + g.wy[b, c][:, None]
        n = n + 1.0
        scored += K - size
        size += 1
    return best_mask, best


def _smooth(y: Tensor) -> Tensor:
    ys = y + GREEDY_SMOOTH
    return (ys.double() / ys.double().sum(-1, keepdim=True)).to(y.dtype)


def mad_oracle(
    y: Tensor,
    *,
    p: Optional[Tensor] = None,
    h_sqnorm: Optional[Tensor] = None,
    gram: Optional[Tensor] = None,
    oracle: str = "extreme",
    objmax: bool = False,
    exact_max_k: int = 16,
    max_candidates: int = 1024,
    generator: Optional[torch.Generator] = None,
    index: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    B, K = y.shape
    dtype = y.dtype
    if B == 0:
        return y.new_empty((0, K)), y.new_empty((0,))
    b = torch.arange(B, device=y.device)
    if oracle == "argmax":
        kstar = y.argmax(-1)
        if K <= exact_max_k:
            mask, v = _argmax_exact(_Gram(y, p, h_sqnorm, gram), kstar, objmax)
        else:
            mask, v = _argmax_greedy(_Gram(_smooth(y), p, h_sqnorm, gram), kstar, max_candidates)
        return _vertex_from_mask(mask, kstar, dtype), v.to(dtype)
    g = _Gram(y, p, h_sqnorm, gram)
    vals = g.singles(objmax)
    if oracle == "extreme":
        k, v = _first_best(vals, objmax)
    else:
        if oracle == "argmin":
            k = y.argmin(-1)
        else:
            if index is None:
                gen_device = generator.device if generator is not None else torch.device("cpu")
                index = torch.randint(K, (B,), generator=generator, device=gen_device).to(y.device)
            k = index
        v = vals[b, k]
    ystar = torch.zeros_like(y)
    ystar[b, k] = 1
    return ystar, v.to(dtype)


def mad_objective(
    y_tilde: Tensor,
    y: Tensor,
    *,
    p: Optional[Tensor] = None,
    h_sqnorm: Optional[Tensor] = None,
    gram: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    yt, yd = y_tilde.double(), y.double()
    tt, yy = (yt * yt).sum(-1), (yd * yd).sum(-1)
    if gram is not None:
        M = gram.double()
        mt = torch.bmm(M, yt.unsqueeze(-1)).squeeze(-1)
        my = torch.bmm(M, yd.unsqueeze(-1)).squeeze(-1)
        A, C, Y = (yt * mt).sum(-1), (yt * my).sum(-1), (yd * my).sum(-1)
        D = ((yt - yd) * (mt - my)).sum(-1)
        scale = torch.diagonal(M, dim1=1, dim2=2).sum(-1).clamp(min=0) / y.shape[1]
        obj = _angular(A, C, Y, ZERO_REL * scale * tt, ZERO_REL * scale * yy)
        sur = D.clamp(min=0)
    else:
        pd = p.double() if p is not None else torch.zeros_like(yd)
        hsq = h_sqnorm.double() if h_sqnorm is not None else torch.ones_like(tt)
        wt = yt - pd * yt.sum(-1, keepdim=True)
        wy = yd - pd * yd.sum(-1, keepdim=True)
        A, C, Y = (wt * wt).sum(-1), (wt * wy).sum(-1), (wy * wy).sum(-1)
        obj = _angular(A, C, Y, ZERO_REL * tt, ZERO_REL * yy)
        sur = hsq * ((wt - wy) ** 2).sum(-1)
        zero = torch.zeros_like(obj)
        obj = torch.where(hsq > 0, obj, zero)
        sur = torch.where(hsq > 0, sur, zero)
    return obj.to(y.dtype), sur.to(y.dtype)


def _kl_to_mix(y: Tensor, ys: Tensor, alpha: Tensor) -> Tensor:
    h = (1.0 - alpha)[:, None] * y + alpha[:, None] * ys
    pos = y > 0
    safe_h = torch.where(h > 0, h, torch.ones_like(h))
    safe_y = torch.where(pos, y, torch.ones_like(y))
    terms = torch.where(pos, y * (torch.log(safe_y) - torch.log(safe_h)), torch.zeros_like(y))
    kl = terms.sum(-1)
    infeasible = (pos & ~(h > 0)).any(-1)
    return torch.where(infeasible, torch.full_like(kl, math.inf), kl)


def mad_step(y: Tensor, y_star: Tensor, epsilon: float, ydist: str = "l1", kl_steps: int = 15) -> Tensor:
    yd, sd = y.double(), y_star.double()
    eps = float(epsilon)
    if ydist == "kl" and eps <= 0.0:
        alpha = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    elif ydist == "kl":
        B = y.shape[0]
        one = torch.ones(B, dtype=torch.float64, device=y.device)
        feasible_high = _kl_to_mix(yd, sd, one) <= eps
        lo, hi = torch.zeros_like(one), one.clone()
        alpha = torch.zeros_like(one)
        for _ in range(kl_steps):
            mid = 0.5 * (lo + hi)
            ok = _kl_to_mix(yd, sd, mid) <= eps
            lo = torch.where(ok, mid, lo)
            alpha = torch.where(ok, mid, alpha)
            hi = torch.where(ok, hi, mid)
        alpha = torch.where(feasible_high, one, alpha)
    else:
        d = yd - sd
        norm = d.abs().sum(-1) if ydist == "l1" else torch.sqrt((d * d).sum(-1))
        alpha = (eps / (norm + ALPHA_EPS)).clamp(0.0, 1.0)
    out = ((1.0 - alpha)[:, None] * yd + alpha[:, None] * sd).to(y.dtype)
    # keep ỹ_k > 0 where y_k > 0 (an underflow to 0 would make KL(y‖ỹ) infinite)
    tiny = torch.finfo(y.dtype).smallest_normal * torch.finfo(y.dtype).eps
    return torch.where((out == 0) & (y > 0), torch.full_like(out, tiny), out)


def _simplex_tau(u: Tensor, radius: float) -> Tensor:
    """Duchi et al. (2008): τ with Σ max(u − τ, 0) = radius, per row."""
    K = u.shape[1]
    srt = torch.sort(u, dim=-1, descending=True).values
    css = srt.cumsum(-1) - radius
    ind = torch.arange(1, K + 1, dtype=u.dtype, device=u.device)
    cond = srt - css / ind > 0
    rho = cond.sum(-1, keepdim=True).clamp(min=1)  # cond holds on a prefix
    return css.gather(-1, rho - 1) / rho.to(u.dtype)


def project_simplex(v: Tensor, radius: float = 1.0) -> Tensor:
    tau = _simplex_tau(v, radius)
    out = (v - tau).clamp(min=0)
    keep = (v >= 0).all(-1, keepdim=True) & (v.double().sum(-1, keepdim=True) == radius)
    return torch.where(keep, v, out)


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    u = v.abs()
    out = torch.sign(v) * (u - _simplex_tau(u, radius)).clamp(min=0)
    keep = u.double().sum(-1, keepdim=True) <= radius
    return torch.where(keep, v, out)


GRAD2_FLOOR = 1e-15  # GR: clamp(x, 1e-15, 1) before renormalising


def grad2_allocate(p: Tensor, c: Tensor, epsilons) -> Tensor:
    if isinstance(epsilons, (int, float)):
        epsilons = [epsilons]
    pd = p.double()
    B, K = p.shape
    eps = torch.as_tensor([float(e) for e in epsilons], dtype=torch.float64, device=p.device)
    r = c.argmin(1)  # first minimum
    rows = torch.arange(B, device=p.device)
    pr = pd[rows, r]
    donors = pd.clone()
    donors[rows, r] = 0.0  # the receiver gives nothing
    order = torch.sort(c, dim=1, descending=True, stable=True).indices  # equal c: lowest index first
    ps = donors.gather(1, order)  # [B, K]
    S = ps.cumsum(1) - ps  # exclusive
    G = torch.minimum((1.0 - pr)[:, None], eps[None, :] / 2)  # [B, E]
    take_sorted = torch.minimum((G[:, :, None] - S[:, None, :]).clamp(min=0.0), ps[:, None, :])
    take = torch.zeros_like(take_sorted).scatter_(2, order[:, None, :].expand_as(take_sorted), take_sorted)
    x = pd[:, None, :] - take
    x[rows, :, r] = pr[:, None] + take.sum(2)
    x = x.clamp(GRAD2_FLOOR, 1.0)
    return (x / x.sum(2, keepdim=True)).to(p.dtype)

# ---------------------------------------------------------------------------------------
# ModelGuard-W: a 1-D convex search over t = x_m like csrc/modelguard_math.h, done differently
# so that the two check each other: here the feasible t interval's ends are bisected first and
# f is golden-section searched inside it (the kernels search a penalised f on [lo, 1] in one
# pass), and the inner problem for a fixed t is solved in closed form instead of by the
# kernels' two-pointer walk: the voluntary transfer v* = min(R/2, room, mass,
# max_p min(cumcap_{<p} − a0, mass_{≥p} − b0)) over the split positions p between strictly
# increasing costs.

MG_BISECT_ITERS = 55
MG_GOLDEN_ITERS = 80
MG_BUDGET_TOL = 1e-12  # ε is honoured to this (absolute), as in the kernels
_GOLDEN = 0.6180339887498948482


class _MgRows:
    def __init__(self, y: Tensor, epsilon: float, margin: float, log_offset: float):
        yd = y.double()
        B, K = yd.shape
        self.B, self.K, self.eps, self.delta = B, K, float(epsilon) + MG_BUDGET_TOL, float(margin)
        self.c = torch.log(yd + log_offset)
        self.m = yd.argmax(1)  # first max
        order = torch.sort(self.c, dim=1, stable=True).indices
        keep = order != self.m[:, None]
        self.ord = order[keep].view(B, K - 1)  # non-top classes, ascending c, ties by index
        self.ys = yd.gather(1, self.ord)
        self.cs = self.c.gather(1, self.ord)
        self.ym = yd.gather(1, self.m[:, None])[:, 0]
        self.cm = self.c.gather(1, self.m[:, None])[:, 0]
        ones = torch.ones(B, 1, dtype=torch.bool, device=y.device)
        # split p (0..K−1) may separate receivers (< p) from donors (≥ p): costs must differ
        self.split_ok = torch.cat([ones, self.cs[:, 1:] > self.cs[:, :-1], ones], 1)

    def g(self, t: Tensor) -> Tensor:
        U = t - self.delta
        z = torch.minimum(self.ys, U[:, None])
        F = (self.ys - z).sum(1)
        sz = z.sum(1)
        D = (1.0 - t) - sz
        g = (self.ym - t).abs() + F + D.abs()
        bad = (U < 0) | (D > (self.K - 1) * U - sz + 1e-15)
        return torch.where(bad, torch.full_like(g, math.inf), g)

    def inner(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        """f(t) [B] (inf where infeasible) and the sorted non-top x [B, K−1]."""
        U = t - self.delta
        z = torch.minimum(self.ys, U.clamp(min=0)[:, None])
        F = (self.ys - z).sum(1)
        D = (1.0 - t) - z.sum(1)
        R = self.eps - (self.ym - t).abs() - F - D.abs()
        cap = U[:, None] - z
        cum_r = cap.cumsum(1)
        suf_d = z.flip(1).cumsum(1).flip(1)
        zero = torch.zeros_like(t)[:, None]
        before = torch.cat([zero, cum_r], 1)  # room in positions < p
        from_p = torch.cat([suf_d, zero], 1)  # mass in positions ≥ p
        a0, b0 = D.clamp(min=0), (-D).clamp(min=0)
        cross = torch.minimum(before - a0[:, None], from_p - b0[:, None])
        cross = torch.where(self.split_ok, cross, torch.full_like(cross, -math.inf)).amax(1)
        v = torch.minimum(torch.minimum(0.5 * R, cross), torch.minimum(cum_r[:, -1] - a0, suf_d[:, 0] - b0))
        v = v.clamp(min=0)
        a, b = a0 + v, b0 + v
        fill = (a[:, None] - (cum_r - cap)).clamp(min=0)
        fill = torch.minimum(fill, cap)
        drain = (b[:, None] - (suf_d - z)).clamp(min=0)
        drain = torch.minimum(drain, z)
        x = (z + fill - drain).clamp(min=0)
        f = self.cm * t + (self.cs * x).sum(1)
        bad = (U < 0) | (R < 0) | (a > cum_r[:, -1] + 1e-12) | (b > suf_d[:, 0] + 1e-12)
        return torch.where(bad, torch.full_like(f, math.inf), f), x

    def f(self, t: Tensor) -> Tensor:
        return self.inner(t)[0]

    def boundary(self, feas: Tensor, infeas: Tensor) -> Tensor:
        for _ in range(MG_BISECT_ITERS):
            mid = 0.5 * (feas + infeas)
            ok = self.g(mid) <= self.eps
            feas, infeas = torch.where(ok, mid, feas), torch.where(ok, infeas, mid)
        return feas


def _mg_golden(a: Tensor, b: Tensor, fn) -> Tensor:
    fa, fb_ = fn(a), fn(b)
    tb = torch.where(fb_ < fa, b, a)
    fbest = torch.minimum(fa, fb_)
    x1, x2 = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    f1, f2 = fn(x1), fn(x2)
    for _ in range(MG_GOLDEN_ITERS):
        left = f1 <= f2  # keep [a, x2]
        b = torch.where(left, x2, b)
        a = torch.where(left, a, x1)
        nx1 = torch.where(left, b - _GOLDEN * (b - a), x2)
        nx2 = torch.where(left, x1, a + _GOLDEN * (b - a))
        new = fn(torch.where(left, nx1, nx2))
        f1, f2 = torch.where(left, new, f2), torch.where(left, f1, new)
        x1, x2 = nx1, nx2
        for xv, fv in ((x1, f1), (x2, f2)):
            better = fv < fbest
            tb, fbest = torch.where(better, xv, tb), torch.where(better, fv, fbest)
    return tb


def modelguard_w_solve(y: Tensor, epsilon: float, margin: float = 1e-4,
                       log_offset: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    B, K = y.shape
    if B == 0:
        return y.new_empty((0, K)), y.new_empty((0,)), torch.zeros(0, dtype=torch.bool, device=y.device)
    r = _MgRows(y, epsilon, margin, log_offset)
    yd = y.double()
    lo_v = max((1.0 + (K - 1) * r.delta) / K, r.delta)
    lo = torch.full((B,), lo_v, dtype=torch.float64, device=y.device)
    hi = torch.ones_like(lo)
    others = yd.scatter(1, r.m[:, None], -math.inf).amax(1)
    margin_ok = (r.ym - others >= r.delta) & (r.ym >= lo) & (r.ym <= hi)
    t0 = torch.where(margin_ok, r.ym, _mg_golden(lo, hi, r.g) if not bool(margin_ok.all()) else r.ym)
    feasible = (r.g(t0) <= r.eps) & (lo_v <= 1.0)
    a = torch.where(r.g(lo) <= r.eps, lo, r.boundary(t0, lo))
    b = torch.where(r.g(hi) <= r.eps, hi, r.boundary(t0, hi))
    a, b = torch.where(feasible, a, t0), torch.where(feasible, b, t0)
    t = _mg_golden(a, b, r.f)
    f, xs = r.inner(t)
    fallback = ~torch.isfinite(f)
    if bool(fallback.any()):
        f0, xs0 = r.inner(t0)
        t, xs = torch.where(fallback, t0, t), torch.where(fallback[:, None], xs0, xs)
    x = torch.empty_like(yd)
    x.scatter_(1, r.ord, xs)
    x.scatter_(1, r.m[:, None], t[:, None])
    x = torch.where(feasible[:, None], x, yd)
    obj = (r.c * x).sum(1)
    return x.to(y.dtype), obj.to(y.dtype), feasible
