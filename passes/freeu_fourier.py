"""FreeU Fourier skip filter (fftn -> fftshift -> mask -> ifftshift -> ifftn -> real) -> real matmuls.

The low-frequency mask is M = 1 + (s - 1) R with R = r_h r_w^T a rectangle, so for static H, W

    filter(x) = x + (s - 1) Re(A x B^T),   A = F_H^-1 diag(ifftshift(r_h)) F_H,  B likewise for W,

and Re(A x B^T) = Ar x Br^T - Ai x Bi^T for real x: two pairs of real matmuls with H x H and W x W
operators derived in float64 when the pass runs and checked against torch.fft.

The matmuls run in the dtype the FFT ran in: diffusers (and our FreeU) upcast bf16/fp16 skips to float32
for the FFT and round the filtered result back once, so the upcast and the final cast stay in the graph.
Running the operators in bf16 instead would round x, the operators and every partial product to bf16.
"""
import logging

import torch
import torch.fx as fx

from ._context import only_user, val

log = logging.getLogger("passes")
aten = torch.ops.aten

_FFT = {aten.fft_fftn.default, aten.fft_fft2.default}
_IFFT = {aten.fft_ifftn.default, aten.fft_ifft2.default}


def _dims(node, pos, ndim, default=(-2, -1)):
    d = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", default)
    return tuple(sorted(int(i) % ndim for i in d)) if d is not None else None


def _fft_ok(node, ndim):
    s = node.args[1] if len(node.args) > 1 else node.kwargs.get("s")
    norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("norm")
    return s is None and norm in (None, "backward") and _dims(node, 2, ndim) == (ndim - 2, ndim - 1)


def _match(fft: fx.Node):
    """fftn node -> (x, real node, mask, mask multiply) or None; x is the FFT's (real) input."""
    xin = fft.args[0]
    ndim = val(xin).dim()
    if ndim < 2 or not _fft_ok(fft, ndim):
        return None
    sh = only_user(fft)
    if sh is None or sh.target is not aten.fft_fftshift.default or _dims(sh, 1, ndim, None) != (ndim - 2, ndim - 1):
        return None
    mul = only_user(sh)
    if mul is None or mul.target is not aten.mul.Tensor:
        return None
    mask = mul.args[1] if mul.args[0] is sh else mul.args[0]
    if not isinstance(mask, fx.Node):
        return None
    ish = only_user(mul)
    if ish is None or ish.target is not aten.fft_ifftshift.default or _dims(ish, 1, ndim, None) != (ndim - 2, ndim - 1):
        return None
    ifft = only_user(ish)
    if ifft is None or ifft.target not in _IFFT or not _fft_ok(ifft, ndim):
        return None
    real = only_user(ifft)
    if real is None or real.target is not aten.real.default:
        return None
    return xin, real, mask, mul


def _rect(d: torch.Tensor):
    """d (..., H, W) = c * outer(rh, rw) with 0/1 vectors, same for every leading index -> (c, rh, rw)."""
    d = d.reshape(-1, *d.shape[-2:]).double()
    if not torch.equal(d, d[:1].expand_as(d)):
        return None
    d = d[0]
    nz = d.nonzero()
    if len(nz) == 0:
        return 0.0, None, None
    c = d[tuple(nz[0])].item()
    r = d / c
    rh, rw = (r != 0).any(1).double(), (r != 0).any(0).double()
    return (c, rh, rw) if torch.equal(r, torch.outer(rh, rw)) else None


def _operator(r: torch.Tensor) -> torch.Tensor:
    """Complex N x N matrix of x -> ifft(ifftshift(fftshift(fft(x)) * r)) (along one axis)."""
    n = r.numel()
    eye = torch.eye(n, dtype=torch.complex128)
    return torch.fft.ifft(torch.fft.ifftshift(r).to(torch.complex128)[:, None] * torch.fft.fft(eye, dim=0), dim=0)


def _check(a, b, c, rh, rw) -> bool:
    x = torch.randn(3, len(rh), len(rw), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = 1 + c * torch.outer(rh, rw)
    ref = torch.fft.ifftn(torch.fft.ifftshift(torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1)) * m,
                                              dim=(-2, -1)), dim=(-2, -1)).real
    ours = x + c * (a.real @ x @ b.real.T - a.imag @ x @ b.imag.T)
    return torch.allclose(ours, ref, atol=1e-10, rtol=0)


def freeu_fourier(gm: fx.GraphModule, ctx) -> int:
    """Replace each FreeU Fourier filter by x + (s-1)(Ar x Br^T - Ai x Bi^T), in the FFT's dtype: no fft or complex."""
    graph, n = gm.graph, 0
    for fft in [f for f in graph.nodes if f.op == "call_function" and f.target in _FFT]:
        hit = _match(fft)
        if hit is None:
            log.info("freeu_fourier: %s does not match the FreeU filter", fft)
            continue
        x, out, mask, mul = hit
        xv = val(x)
        H, W = xv.shape[-2:]
        s_node, coef = None, None
        m = ctx.evaluate(mask, at=mul)
        if m is not None:
            rect = _rect(m - 1)
        else:  # the scale is a runtime tensor: read R off the mask at s = 0, 1, 2
            leaves = ctx.runtime_leaves(mask, at=mul) or []
            if len(leaves) != 1 or val(leaves[0]).numel() != 1 or not val(leaves[0]).is_floating_point():
                log.info("freeu_fourier: mask of %s depends on %d runtime tensors; skipped", fft, len(leaves))
                continue
            s_node = leaves[0]
            ms = [ctx.evaluate(mask, {s_node: torch.full(val(s_node).shape, float(v), dtype=val(s_node).dtype)},
                  at=mul) for v in (0, 1, 2)]
            if any(t is None for t in ms) or not torch.all(ms[1] == 1) or not torch.equal(ms[2] - 1, 1 - ms[0]):
                continue
            rect = _rect(1 - ms[0])
            if rect is not None and rect[0] not in (0.0, 1.0):
                rect = None
        if rect is None:
            log.info("freeu_fourier: mask of %s is not a rectangle; skipped", fft)
            continue
        c, rh, rw = rect
        with graph.inserting_before(out.next):
            if c == 0.0:  # mask of ones (or s == 1): the filter is the identity
                y = x
            else:
                a, b = _operator(rh), _operator(rw)
                if ctx.config.check_operators and not _check(a, b, 1.0, rh, rw):
                    log.warning("freeu_fourier: operator check failed for %s", fft)
                    continue
                k = c if s_node is None else 1.0  # constant scale folded into the row operators
                ops = [ctx.add_constant(f"_freeu.fourier_{name}_{N}", t.to(xv.dtype)) for name, N, t in
                       (("ar", H, k * a.real), ("ai", H, k * a.imag), ("brt", W, b.real.T), ("bit", W, b.imag.T))]
                t1 = ctx.call(aten.matmul.default, (x, ops[2]), like=out)
                t2 = ctx.call(aten.matmul.default, (x, ops[3]), like=out)
                u1 = ctx.call(aten.matmul.default, (ops[0], t1), like=out)
                u2 = ctx.call(aten.matmul.default, (ops[1], t2), like=out)
                d = ctx.call(aten.sub.Tensor, (u1, u2), like=out)
                if s_node is not None:
                    s1 = ctx.call(aten.sub.Tensor, (s_node, 1), like=out)
                    if val(s1).dtype != xv.dtype:
                        s1 = ctx.call(aten.to.dtype, (s1, xv.dtype), like=out)
                    d = ctx.call(aten.mul.Tensor, (d, s1), like=out)
                y = ctx.call(aten.add.Tensor, (x, d), like=out)
        out.replace_all_uses_with(y)
        n += 1
    log.info("freeu_fourier: %d Fourier filter(s) replaced", n)
    return n
