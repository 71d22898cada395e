"""The wire format of the served UNet: safetensors bytes over HTTP (no Ray, no pickle on the client side).

Request (HTTP POST body, `Content-Type: application/octet-stream`): a safetensors file whose tensors are the
call's inputs, named as the artifact names them (as `compiled-unet run --inputs` reads them):

    sample                               [b, C, H, W]   (b = this request's batch; 1 <= b <= largest bucket)
    timestep                             [b] or []      (a scalar is broadcast to the request's b rows)
    encoder_hidden_states                [b, seq, dim]
    added_cond_kwargs['text_embeds'] ... every other input the artifact takes, batch first

and optionally the metadata entry "request_id" (string; echoed back; one is made up when absent). Every
non-tensor input takes the value the artifact was compiled with.

Response (200): a safetensors file with one tensor "sample" [b, C_out, H, W] and string metadata:
request_id, bucket_batch (the compiled batch that ran), rows (real rows in that call), offset (this
request's first row in it), batch_ids (JSON list of the request ids in the call, in row order), replica.
Errors: 400 with a plain-text message for a request no bucket fits or a malformed body; 500 otherwise.

In Python, a Ray handle takes and returns dicts instead: `handle.infer.remote({"sample": ..., "timestep": ...,
"encoder_hidden_states": ..., "added_cond_kwargs": {...}}, request_id)` (torch tensors or numpy arrays) ->
{"sample": tensor, "request_id": str, "info": dict}.
"""
from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

REQUEST_ID = "request_id"


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> bytes:
    """Tensors (+ metadata; non-string values are JSON-encoded) -> safetensors bytes."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta or None)


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors bytes -> (tensors, metadata); a body that is not safetensors is a ValueError saying so."""
    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
        tensors = load(bytes(data))
    except Exception as e:  # noqa: BLE001 - any malformed body is the client's error, said in one line
        raise ValueError(f"request body is not a safetensors file ({type(e).__name__}: {e}); send the inputs as "
                         f"safetensors bytes (see compiled_unet.serving.wire)") from None
    return tensors, dict(meta)
