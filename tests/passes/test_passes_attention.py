"""QKV fusion, hand-written and sliced attention -> SDPA, per-head mask -> broadcast mask."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiled_unet import passes
from tests.closeness import assert_close

ATTN = [passes.remove_asserts, passes.remove_noops, passes.attention_to_sdpa, passes.merge_sliced_attention,
        passes.broadcast_attention_mask]


class Attn(nn.Module):
    """diffusers-style attention: separate to_q/to_k/to_v, head split, optional mask, several processors."""

    def __init__(self, dim=8, heads=2, cross=None, mode="sdpa", bias=False, slice_size=1, upcast=False):
        super().__init__()
        self.heads, self.mode, self.slice_size, self.upcast = heads, mode, slice_size, upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(cross or dim, dim, bias=bias)
        self.to_v = nn.Linear(cross or dim, dim, bias=bias)
        self.scale = (dim // heads) ** -0.5

    def head_to_batch(self, t):
        B, L, D = t.shape
        return t.reshape(B, L, self.heads, D // self.heads).permute(0, 2, 1, 3).reshape(B * self.heads, L, -1)

    def scores(self, q, k, mask):
        dtype = q.dtype
        if self.upcast:
            q, k = q.float(), k.float()
        if mask is None:
            inp, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), 0
        else:
            inp, beta = mask.to(q.dtype), 1
        return torch.baddbmm(inp, q, k.transpose(-1, -2), beta=beta, alpha=self.scale).softmax(dim=-1).to(dtype)

    def forward(self, x, ctx=None, mask=None):
        B, L, D = x.shape
        c = x if ctx is None else ctx
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        if mask is not None:  # diffusers: (1 - m) * -10000, per-head copy
            mask = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1).repeat_interleave(self.heads, dim=0)
        if self.mode == "sdpa":
            q4, k4, v4 = (t.view(B, -1, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
            m4 = None if mask is None else mask.view(B, self.heads, -1, mask.shape[-1])
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=m4)
            return o.transpose(1, 2).reshape(B, -1, D)
        q, k, v = (self.head_to_batch(t) for t in (q, k, v))
        if self.mode == "classic":
            o = torch.bmm(self.scores(q, k, mask), v)
        elif self.mode == "sliced_cat":
            o = torch.cat([torch.bmm(self.scores(q[s:s + self.slice_size], k[s:s + self.slice_size],
                                                 None if mask is None else mask[s:s + self.slice_size]),
                                     v[s:s + self.slice_size]) for s in range(0, q.shape[0], self.slice_size)])
        else:  # sliced
            o = torch.zeros(q.shape[0], q.shape[1], D // self.heads, dtype=q.dtype)
            for s in range(0, q.shape[0], self.slice_size):
                e = s + self.slice_size
                o[s:e] = torch.bmm(self.scores(q[s:e], k[s:e], None if mask is None else mask[s:e]), v[s:e])
        return o.reshape(B, self.heads, L, -1).permute(0, 2, 1, 3).reshape(B, L, D)


def _inputs(B=2, L=6, Lc=5, dim=8, cross=None, masked=True):
    x = torch.randn(B, L, dim)
    c = torch.randn(B, Lc, cross) if cross else None
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])[:B, :Lc] if masked else None  # row 2 fully masked
    return x, c, m


@pytest.mark.parametrize("mode", ["classic", "sliced", "sliced_cat"])
@pytest.mark.parametrize("masked", [True, False])
def test_handwritten_and_sliced_attention_become_one_sdpa(g, mode, masked):
    x, c, m = _inputs(cross=4, masked=masked)
    mod = Attn(cross=4, mode=mode, slice_size=1)
    ep2, rep = g.optimize(g.export(mod, x, c, m), *ATTN)
    assert rep["attention_to_sdpa"] == (1 if mode == "classic" else 4)
    assert rep["merge_sliced_attention"] == (0 if mode == "classic" else 1)
    assert rep["broadcast_attention_mask"] == int(masked)
    assert g.count(ep2, "scaled_dot_product_attention") == 1
    assert g.count(ep2, "bmm", "softmax", "repeat_interleave", "copy_", "zeros", "cat") == 0
    sdpa = next(n for n in ep2.graph.nodes if "scaled_dot_product" in str(n.target))
    assert sdpa.meta["val"].dim() == 4
    assert_close(g.run(ep2, x, c, m), mod(x, c, m), scale_tol=1e-5)


def test_mask_broadcast_is_identical_including_fully_masked_rows(g):
    x, c, m = _inputs(cross=4)
    mod = Attn(cross=4, mode="sdpa")
    ep = g.export(mod, x, c, m)
    ep2, rep = g.optimize(ep, *ATTN)
    assert rep["broadcast_attention_mask"] == 1 and g.count(ep2, "repeat_interleave") == 0
    sdpa = next(n for n in ep2.graph.nodes if "scaled_dot_product" in str(n.target))
    assert sdpa.args[3].meta["val"].shape[1] == 1          # one mask broadcast over heads
    assert torch.equal(g.run(ep2, x, c, m), g.run(ep, x, c, m))


def test_upcast_attention_in_bf16(g):
    x, c, m = _inputs(cross=4)
    mod = Attn(cross=4, mode="classic", upcast=True).to(torch.bfloat16)
    args = (x.bfloat16(), c.bfloat16(), m)
    ep2, rep = g.optimize(g.export(mod, *args), *ATTN)
    assert rep["attention_to_sdpa"] == 1 and g.count(ep2, "softmax", "baddbmm") == 0
    assert_close(g.run(ep2, *args).float(), mod(*args).float(), scale_tol=2e-2)


class ProbsEscape(Attn):
    def forward(self, x):
        q, k, v = (self.head_to_batch(t(x)) for t in (self.to_q, self.to_k, self.to_v))
        p = torch.bmm(q, k.transpose(-1, -2)).mul(self.scale).softmax(-1)
        return torch.bmm(p, v), p.sum()       # the probabilities have another user


class WrongAxis(Attn):
    def forward(self, x):
        q, k, v = (self.head_to_batch(t(x)) for t in (self.to_q, self.to_k, self.to_v))
        return torch.bmm(torch.bmm(q, k.transpose(-1, -2)).softmax(1), v)   # softmax over queries


@pytest.mark.parametrize("cls", [ProbsEscape, WrongAxis])
def test_attention_negative(g, cls):
    x = torch.randn(2, 6, 8)
    mod = cls()
    ep2, rep = g.optimize(g.export(mod, x), *ATTN)
    assert rep["attention_to_sdpa"] == 0 and g.count(ep2, "scaled_dot_product") == 0
    for got, ref in zip(g.run(ep2, x), mod(x)):
        assert_close(got, ref, scale_tol=1e-5)


class HeadsMajorMask(Attn):
    def forward(self, x, mask):       # per-head copy viewed heads-major (h, B, ...): not a broadcast over heads
        B, L, D = x.shape
        q4, k4, v4 = (t(x).view(B, -1, self.heads, D // self.heads).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        m = mask.unsqueeze(1).repeat_interleave(self.heads, dim=0).view(self.heads, B, 1, L).transpose(0, 1)
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=m)


class Out4Mask(Attn):
    def forward(self, x, mask):       # diffusers' prepare_attention_mask(out_dim=4): repeat over dim 1
        B, L, D = x.shape
        q4, k4, v4 = (t(x).view(B, -1, self.heads, D // self.heads).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        m = mask.unsqueeze(1).unsqueeze(1).repeat_interleave(self.heads, dim=1)
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=m)


def test_mask_negative_and_out_dim_4(g):
    x, mask = torch.randn(3, 6, 8), torch.randn(3, 6)
    ep = g.export(HeadsMajorMask(), x, mask)
    ep2, rep = g.optimize(ep, *ATTN)
    assert rep["broadcast_attention_mask"] == 0 and g.count(ep2, "repeat_interleave") == 1
    ep = g.export(Out4Mask(), x, mask)
    ep2, rep = g.optimize(ep, *ATTN)
    assert rep["broadcast_attention_mask"] == 1 and g.count(ep2, "repeat_interleave") == 0
    assert torch.equal(g.run(ep2, x, mask), g.run(ep, x, mask))


def test_slice_attention_reverse(g):
    x, c, m = _inputs(cross=4)
    mod = Attn(dim=16, heads=4, cross=4, mode="sdpa")
    x = torch.randn(2, 6, 16)
    ep = g.export(mod, x, c, m)
    ep2, rep = g.optimize(ep, *ATTN, passes.SliceAttention(2))
    assert rep["slice_attention(2)"] == 1 and g.count(ep2, "scaled_dot_product") == 2
    assert_close(g.run(ep2, x, c, m), mod(x, c, m), scale_tol=1e-5)
    with pytest.raises(ValueError):
        passes.SliceAttention(0)


# ---------------------------------------------------------------------------------------------- QKV

class TwoLayers(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.attn1 = Attn(bias=bias)
        self.attn2 = Attn(cross=4, bias=bias)
        self.attn3 = Attn(cross=4, bias=bias)

    def forward(self, x, c):
        return self.attn3(self.attn2(self.attn1(x), c), c)


@pytest.mark.parametrize("bias", [False, True])
def test_fuse_qkv(g, bias):
    x, c = torch.randn(2, 6, 8), torch.randn(2, 5, 4)
    mod = TwoLayers(bias)
    ep2, rep = g.optimize(g.export(mod, x, c), passes.fuse_qkv)
    # attn1 q,k,v; attn2 k,v and attn3 k,v read the same c but belong to different layers
    assert rep["fuse_qkv"] == 3
    assert g.count(ep2, "linear") == 3 + 2 and g.count(ep2, "split_with_sizes") == 3
    keys = set(ep2.state_dict)
    assert {"attn1.to_qkv.weight", "attn2.to_kv.weight", "attn3.to_kv.weight"} <= keys
    assert "attn1.to_q.weight" not in keys
    assert_close(g.run(ep2, x, c), mod(x, c), scale_tol=1e-5)
    ep3, rep3 = g.optimize(ep2, passes.fuse_qkv)          # idempotent
    assert rep3["fuse_qkv"] == 0


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8, bias=True)
        self.to_k = nn.Linear(8, 8, bias=False)

    def forward(self, x, w):
        return self.to_q(x) + self.to_k(x) + F.linear(x, w) + F.linear(x, w * 2)


def test_fuse_qkv_negative(g):
    x, w = torch.randn(2, 8), torch.randn(8, 8)
    ep2, rep = g.optimize(g.export(Mixed(), x, w), passes.fuse_qkv)   # mixed bias; runtime weights
    assert rep["fuse_qkv"] == 0 and g.count(ep2, "linear") == 4
