"""Request batching over a loaded artifact: which requests may share a graph call, and into which bucket.

No Ray here (the deployment in `deployment.py` calls this); the load benchmark and the tests use it directly.

A request is one UNet call: flat tensors named like the artifact's inputs ("sample", "timestep",
"encoder_hidden_states", "added_cond_kwargs['text_embeds']", ...; see `wire.py`) whose first dimension is
the request's batch ("rows"). A group of requests runs as one call of a compiled bucket when:

- every input has the same per-row shape and dtype (a bucket is one static shape; the batch is dim 0);
- every input is *per row*: conditioning (text embeddings, masks, added conditions) and the timestep are
  concatenated along the batch, never shared, so each row sees its own request's values. An input the graph
  takes without a batch dimension (e.g. a timestep exported as a scalar) is shared by the whole call, so only
  requests whose values for it are bit-identical are combined;
- their rows fit the largest compiled batch. The group then runs in the smallest bucket that holds its rows,
  padded by repeating the last real row (a valid input, so no NaN/inf can appear in padding rows), and each
  request gets its own rows of the output back.

What can still make a batched answer differ from the unbatched one: the UNet has no cross-row operation
(GroupNorm and attention are per sample), but a compiled bucket for batch 2 is different machine code from
the one for batch 1 (other GEMM/conv blocking), so a row's result may differ by float rounding (relative L2
~1e-7) between buckets and between row positions. It is bit-identical when the batch composition is
(same bucket, same rows at the same offsets, same padding); `Result.info` says which composition ran.

A request no bucket fits (other shapes, dtype, inputs, or more rows than the largest compiled batch) is a
ValueError naming its shapes and listing the buckets, raised before it joins any batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..runtime.compiled import FREEU_INPUT, CompiledUNet
from ..runtime.signature import FORWARD_ARGS, _path_name, dtype_name


def flatten_inputs(inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Forward arguments (nested dicts/lists as the UNet takes them, torch or numpy leaves) or flat leaf names
    -> {leaf name: tensor}; None values dropped. Non-tensor values are refused (the wire carries tensors)."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"a request is a dict of input tensors, got {type(inputs).__name__}")
    flat: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if value is None:
            continue
        top = key.split("[", 1)[0]
        if top not in FORWARD_ARGS or top == "return_dict":
            raise ValueError(f"unknown input {key!r}; a request holds tensors named after the UNet's inputs "
                             f"{list(FORWARD_ARGS[:-1])} (nested ones as \"added_cond_kwargs['text_embeds']\")")
        leaves, _ = pytree.tree_flatten_with_path(((), {key: value}))
        for path, leaf in leaves:
            name = _path_name(path)     # "added_cond_kwargs['text_embeds']", as the artifact names its inputs
            flat[name] = _as_tensor(name, leaf)
    if "sample" not in flat:
        raise ValueError("a request needs a 'sample' tensor [batch, channels, height, width]")
    return flat


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float)) and name == "timestep":
        return torch.tensor(float(value))
    raise ValueError(f"input {name!r} is {type(value).__name__}; requests carry tensors (torch or numpy) only, "
                     f"and every non-tensor input takes the value the artifact was compiled with")


@dataclasses.dataclass
class Request:
    """One validated request: its tensors, batch rows and the key of the requests it may share a call with."""
    request_id: str
    tensors: dict[str, torch.Tensor]
    rows: int
    key: tuple                  # (the buckets' input key, hashes of shared inputs): equal keys may share a call


@dataclasses.dataclass
class Result:
    request_id: str
    sample: torch.Tensor
    info: dict      # bucket_batch, rows (real rows in the call), offset, batch_ids (request ids in row order)


@dataclasses.dataclass(frozen=True)
class _Bucket:
    unet: CompiledUNet
    batch: int
    per_row: frozenset      # leaf names whose dim 0 is the batch
    key: tuple              # (name, shape without batch, dtype) per row input; (name, shape, dtype) shared


def _bucket(unet: CompiledUNet) -> _Bucket:
    sig = unet.signature
    batch = sig.leaf("sample").shape[0]
    tensors = [x for x in sig.leaves if x.is_tensor and not x.name.startswith(FREEU_INPUT)]
    per_row = frozenset(x.name for x in tensors if len(x.shape) >= 1 and x.shape[0] == batch)
    key = tuple(sorted((x.name, tuple(x.shape[1:]) if x.name in per_row else ("shared", *x.shape), x.dtype)
                       for x in tensors))
    return _Bucket(unet, batch, per_row, key)


def _describe(tensors: Mapping[str, torch.Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {list(v.shape)} {dtype_name(v.dtype)}" for k, v in tensors.items()) + "}"


class Batcher:
    """Packs requests into the compiled buckets of a loaded artifact (a CompiledUNet or a ShapeBuckets)."""

    def __init__(self, artifact):
        unets = list(getattr(artifact, "buckets", [artifact]))
        if not unets or not all(isinstance(u, CompiledUNet) for u in unets):
            raise TypeError(f"Batcher serves a CompiledUNet or ShapeBuckets (compiled_unet.load), got "
                            f"{type(artifact).__name__}")
        # Smallest batch first: a group runs in the first bucket that holds its rows.
        self.buckets = sorted((_bucket(u) for u in unets), key=lambda b: b.batch)

    @property
    def max_rows(self) -> int:
        return max(b.batch for b in self.buckets)

    def describe_buckets(self) -> list[str]:
        return [f"batch {b.batch}: " + ", ".join(f"{n}: [{', '.join(['B', *map(str, s)])}] {d}" if s[:1] != ("shared",)
                                                 else f"{n}: {list(s[1:])} {d} (shared)" for n, s, d in b.key)
                for b in self.buckets]

    def request(self, inputs: Mapping[str, Any], request_id: str | None = None) -> Request:
        """Validate one request (a ValueError naming its shapes and the buckets when none fits)."""
        tensors = flatten_inputs(inputs)
        sample = tensors["sample"]
        if sample.dim() != 4:
            raise ValueError(f"sample must be [batch, channels, height, width], got {list(sample.shape)}")
        rows = sample.shape[0]
        if rows < 1:
            raise ValueError("sample has batch 0: nothing to compute")
        if "timestep" in tensors:
            tensors["timestep"] = self._timestep(tensors["timestep"], rows)
        tensors = {k: v.detach().cpu() for k, v in tensors.items()}
        for bucket in self.buckets:
            key = self._key(bucket, tensors, rows)
            if key is not None and bucket.batch >= rows:
                return Request(request_id or uuid.uuid4().hex, tensors, rows, key)
        fits_shape = [b.batch for b in self.buckets if self._key(b, tensors, rows) is not None]
        why = (f"batch {rows} exceeds the largest compiled batch {max(fits_shape)} for these shapes; split it"
               if fits_shape else "no bucket was compiled for these shapes/dtypes/inputs")
        raise ValueError(f"no compiled bucket fits request {_describe(tensors)}: {why}. Available buckets:\n  "
                         + "\n  ".join(self.describe_buckets()))

    def _timestep(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The timestep as the buckets take it: a scalar or one-element timestep is this request's for each of
        its rows (as the UNet broadcasts it); converted to the compiled dtype as `Signature.bind` does
        (integers exactly into float32; a fractional value into an integer graph is refused, not truncated)."""
        leaf = self.buckets[0].unet.signature.leaf("timestep")
        if leaf is None or not leaf.is_tensor:
            return t
        dtype = getattr(torch, leaf.dtype)
        if not dtype.is_floating_point and t.is_floating_point() and bool((t != t.trunc()).any()):
            raise ValueError(f"timestep {t.tolist()} is fractional but the artifact takes an integer timestep "
                             f"({leaf.dtype}); it would be truncated")
        if t.numel() == 1 and any("timestep" in b.per_row for b in self.buckets):
            t = t.reshape(1).expand(rows).clone()
        return t.to(dtype)

    @staticmethod
    def _key(bucket: _Bucket, tensors: Mapping[str, torch.Tensor], rows: int) -> tuple | None:
        """The grouping key of these tensors for `bucket`, or None when the bucket cannot run them."""
        got, shared = [], []
        for name, v in tensors.items():
            if name in bucket.per_row:
                if v.dim() < 1 or v.shape[0] != rows:
                    return None
                got.append((name, tuple(v.shape[1:]), dtype_name(v.dtype)))
            else:
                got.append((name, ("shared", *v.shape), dtype_name(v.dtype)))
                shared.append((name, hashlib.sha1(v.contiguous().numpy().tobytes()).hexdigest()))
        if tuple(sorted(got)) != bucket.key:
            return None
        return bucket.key, tuple(sorted(shared))

    def pack(self, requests: Sequence[Request]) -> list[tuple[_Bucket, list[Request]]]:
        """Groups of requests (same key, rows <= largest batch), each with the smallest bucket holding it.
        First-fit decreasing over each key's requests, so few calls and little padding."""
        by_key: dict[tuple, list[Request]] = {}
        for r in requests:
            by_key.setdefault(r.key, []).append(r)
        groups = []
        for key, reqs in by_key.items():
            fitting = [b for b in self.buckets if b.key == key[0]]
            cap = max(b.batch for b in fitting)
            bins: list[list[Request]] = []
            for r in sorted(reqs, key=lambda r: -r.rows):
                target = next((b for b in bins if sum(x.rows for x in b) + r.rows <= cap), None)
                if target is None:
                    bins.append([r])
                else:
                    target.append(r)
            for members in bins:
                rows = sum(r.rows for r in members)
                groups.append((next(b for b in fitting if b.batch >= rows), members))
        return groups

    def run(self, requests: Sequence[Request], **info) -> list[Result | BaseException]:
        """Answers in request order; a group whose call failed answers each of its requests with the error."""
        answers: dict[int, Result | BaseException] = {}
        for bucket, members in self.pack(requests):
            try:
                results = self.run_group(bucket, members, **info)
            except Exception as e:  # noqa: BLE001 - handed to each caller of this group, not to the others
                results = [e] * len(members)
            for r, res in zip(members, results):
                answers[id(r)] = res
        return [answers[id(r)] for r in requests]

    def run_group(self, bucket: _Bucket, members: Sequence[Request], **info) -> list[Result]:
        rows = sum(r.rows for r in members)
        values = []
        for leaf in bucket.unet.signature.leaves:
            if not leaf.is_tensor or leaf.name.startswith(FREEU_INPUT):
                values.append(leaf.value if not leaf.is_tensor else None)
            elif leaf.name in bucket.per_row:
                values.append(_pad(torch.cat([r.tensors[leaf.name] for r in members]), bucket.batch))
            else:
                values.append(members[0].tensors[leaf.name])  # shared: identical in every member (the key)
        args, kwargs = bucket.unet.signature.structure(values)
        out = bucket.unet(*args, return_dict=False, **kwargs)[0]
        ids = [r.request_id for r in members]
        results, offset = [], 0
        for r in members:
            # clone: a view would carry (and pickle) the whole batch's storage
            results.append(Result(r.request_id, out[offset:offset + r.rows].clone(),
                                  dict(info, bucket_batch=bucket.batch, rows=rows, offset=offset, batch_ids=ids)))
            offset += r.rows
        return results


def _pad(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows up to `batch` by repeating the last real row (a valid input: padding never makes NaN/inf)."""
    if x.shape[0] == batch:
        return x
    return torch.cat([x, x[-1:].expand(batch - x.shape[0], *x.shape[1:])])
