"""The Ray Serve deployment: one loaded artifact per replica, concurrent requests batched into its buckets.

    from compiled_unet.serving import deployment
    handle = deployment.run_local("unet_buckets/", replicas=2, port=8000)   # ray.init + serve.run
    out = handle.infer.remote({"sample": s, "timestep": t, "encoder_hidden_states": e}, "id-1").result()
    # or HTTP: POST http://127.0.0.1:8000/ with safetensors bytes (compiled_unet.serving.wire)

Ray is imported here only (an optional extra: `pip install compiled_unet[serve]`). Replicas on several
machines are Ray's business: give `address=` (or RAY_ADDRESS) of a running Ray cluster, nothing else changes
(the artifact path must then be readable on every node, e.g. a shared filesystem). `num_cpus_per_replica`
(Ray's accounting) and `torch_threads` default to a 2-core machine with 2 replicas: raise both on
bigger machines.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid

import ray
from ray import serve

from . import wire
from .batching import Batcher, Request

# Errors that mean "the replica went away", not "the request is wrong": retrying on another replica is safe
# (a UNet call has no side effect, so a request that ran on the dead replica and runs again is still answered
# once: the caller keeps the first answer per request id).
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
             serve.exceptions.RequestCancelledError)


def _rows(requests: list) -> int:
    return sum(r.rows for r in requests)


class UNetServer:
    """One replica: loads the artifact once, validates each request, batches concurrent ones (serve.batch)."""

    def __init__(self, artifact: str, batch_wait_timeout_s: float = 0.01, torch_threads: int | None = None):
        import torch

        import compiled_unet

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.batcher = Batcher(compiled_unet.load(artifact))
        # serve.batch counts rows, not requests (batch_size_fn), up to the largest compiled batch.
        self._batched.set_max_batch_size(self.batcher.max_rows)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.replica = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"

    def buckets(self) -> list[str]:
        return self.batcher.describe_buckets()

    async def infer(self, inputs: dict, request_id: str | None = None) -> dict:
        """One request (dict of tensors/arrays, see wire.py) -> {"sample", "request_id", "info"}."""
        request = self.batcher.request(inputs, request_id or uuid.uuid4().hex)  # a ValueError before batching
        result = await self._batched(request)
        if isinstance(result, BaseException):
            raise result
        return {"sample": result.sample, "request_id": result.request_id, "info": result.info}

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _batched(self, requests: list[Request]) -> list:
        # The graph call runs in a worker thread so this replica keeps accepting (and queueing) requests.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.batcher.run(requests, replica=self.replica))

    async def __call__(self, http_request):
        from starlette.responses import PlainTextResponse, Response

        if http_request.method != "POST":
            return PlainTextResponse("POST the inputs as safetensors bytes (see compiled_unet.serving.wire)\n"
                                     + "\n".join(self.batcher.describe_buckets()) + "\n", status_code=405)
        try:
            tensors, meta = wire.decode(await http_request.body())
            out = await self.infer(tensors, meta.get(wire.REQUEST_ID) or http_request.headers.get("x-request-id"))
        except (ValueError, TypeError) as e:
            return PlainTextResponse(f"{e}\n", status_code=400)
        body = wire.encode({"sample": out["sample"]}, {wire.REQUEST_ID: out["request_id"], **out["info"]})
        return Response(body, media_type="application/octet-stream")


def app(artifact: str, *, replicas: int = 2, batch_wait_timeout_s: float = 0.01,
        num_cpus_per_replica: float = 0.5, torch_threads: int | None = 1, max_ongoing_requests: int = 16):
    """The Serve application for `artifact` (a .pt2 or a bucket folder): `serve.run(app(...))`."""
    if not os.path.exists(artifact):
        raise FileNotFoundError(f"no compiled UNet at {artifact!r} (a .pt2 or a bucket folder from compiled_unet.save)")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    deployment = serve.deployment(UNetServer, name="UNetServer").options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus_per_replica},
        max_ongoing_requests=max_ongoing_requests)
    return deployment.bind(os.path.abspath(artifact), batch_wait_timeout_s, torch_threads)


def start_ray(*, address: str | None = None, num_cpus: int | None = None, attempts: int = 3) -> None:
    """ray.init (no dashboard) unless Ray is up already. A local start is tried again when the raylet does not
    register within Ray's fixed 30 s (it happens on a loaded 2-core machine; a retry then usually succeeds)."""
    for attempt in range(1, attempts + 1):
        if ray.is_initialized():
            return
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a slow node start
            if address or "timed out during startup" not in str(e) or attempt == attempts:
                raise
            ray.shutdown()


def run_local(artifact: str, *, replicas: int = 2, port: int = 8000, host: str = "127.0.0.1",
              address: str | None = None, num_cpus: int | None = None, blocking: bool = False, **options):
    """Start Ray (here, or join `address`), serve `artifact` on http://host:port/ and return the handle."""
    start_ray(address=address, num_cpus=num_cpus)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app(artifact, replicas=replicas, **options), name="compiled_unet", route_prefix="/",
                     blocking=blocking)


def infer_with_retry(handle, inputs: dict, request_id: str, *, attempts: int = 5, backoff_s: float = 0.5,
                     timeout_s: float = 120.0) -> dict:
    """`handle.infer` (blocking; call it from threads for concurrency), sent again with the same request id
    when the replica died under it (RETRYABLE): a killed replica costs latency, not answers. A wrong request
    (ValueError) is never retried. The answer gains "attempts" (1 = first try)."""
    for attempt in range(1, attempts + 1):
        try:
            out = handle.infer.remote(inputs, request_id).result(timeout_s=timeout_s)
            return {**out, "attempts": attempt}
        except RETRYABLE:
            if attempt == attempts:
                raise
            time.sleep(backoff_s * attempt)
    raise AssertionError("unreachable")


def shutdown() -> None:
    serve.shutdown()
    ray.shutdown()
