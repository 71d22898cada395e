"""Load (and fault) test of the Ray Serve deployment on this machine, over loopback only, bounded in count.

    python -m benchmarks.serve_load --artifact unet_buckets/ --requests 64 --concurrency 16
    python -m benchmarks.serve_load --artifact unet_buckets/ --kill-after 8     # kill one replica mid-load

Sends N requests of mixed batch sizes (--rows, drawn with a fixed seed) from C client threads through a Ray
Serve handle to R replicas, and reports throughput (rows/s, requests/s), p50/p99 latency and the calls the
server formed (bucket batch, real rows, requests per call). First, the same requests one at a time through
the same artifact loaded in this process (each padded to its nearest bucket; --direct-threads torch threads,
default 1 as in each replica): the no-server baseline.
Every served answer is checked against that direct answer (relative L2 <= 1e-6: another batch composition
is other machine code; bit-equality is checked by tests/test_serving.py where the composition is identical).
Without --artifact, a tiny-preset bundle (batch 1 and 2 at --size) is compiled first (two Inductor compiles).
--json writes the record; --results-md appends a row to a Markdown table (e.g. benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import platform
import random
import tempfile
import time

import torch


def _tiny_bundle(size: int, folder: str) -> str:
    import compiled_unet
    from compiled_unet.buckets import compile_buckets
    from compiled_unet.presets import build_random, example_inputs_for_config, preset

    model = build_random("tiny")
    examples = [example_inputs_for_config(model.config, b, size, size, preset("tiny").seq_len, seed=b) for b in (1, 2)]
    return compiled_unet.save(compile_buckets(model, examples), os.path.join(folder, "tiny_buckets"))


def make_requests(batcher, n: int, rows_choices: list[int], seed: int = 0) -> list[tuple[str, dict]]:
    """n (request id, inputs) with rows drawn from rows_choices; shapes from the artifact's own buckets."""
    rng = random.Random(seed)
    bucket = max(batcher.buckets, key=lambda b: b.batch)
    out = []
    for i in range(n):
        rows = rng.choice(rows_choices)
        g = torch.Generator().manual_seed(seed * 100003 + i)
        inputs = {}
        for leaf in bucket.unet.signature.leaves:
            if not leaf.is_tensor or leaf.name.startswith("freeu_scales"):
                continue
            shape = (rows, *leaf.shape[1:]) if leaf.name in bucket.per_row else leaf.shape
            if leaf.name == "timestep":
                inputs[leaf.name] = torch.full(shape, float(rng.randrange(1000))).to(getattr(torch, leaf.dtype))
            else:
                inputs[leaf.name] = torch.randn(shape, generator=g).to(getattr(torch, leaf.dtype))
        out.append((f"req-{i}", inputs))
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def run_served(handle, requests, concurrency: int, kill_after: int | None = None) -> dict:
    """Send every request from `concurrency` threads; with kill_after=K, ray.kill the replica that answered
    the K-th request (it is busy: the others are in flight). Returns answers by id and latencies."""
    import ray

    from compiled_unet.serving.deployment import infer_with_retry

    answers: dict[str, list] = collections.defaultdict(list)
    latencies, killed = {}, None

    def one(rid, inputs):
        t0 = time.perf_counter()
        out = infer_with_retry(handle, inputs, rid)
        latencies[rid] = time.perf_counter() - t0
        return rid, out

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, rid, x) for rid, x in requests]
        for n_done, fut in enumerate(cf.as_completed(futures), 1):
            rid, out = fut.result()
            answers[out["request_id"]].append(out)
            if kill_after is not None and n_done == kill_after and killed is None:
                killed = out["info"]["replica"]
                ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
    wall = time.perf_counter() - t0
    return {"answers": answers, "latencies": latencies, "wall_s": wall, "killed": killed}


def run_direct(batcher, requests) -> dict:
    """The same requests one at a time through the artifact in this process (no server, no batching)."""
    outs, latencies = {}, {}
    t0 = time.perf_counter()
    for rid, inputs in requests:
        t1 = time.perf_counter()
        (res,) = batcher.run([batcher.request(inputs, rid)])
        latencies[rid] = time.perf_counter() - t1
        outs[rid] = res.sample
    return {"outputs": outs, "latencies": latencies, "wall_s": time.perf_counter() - t0}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}; torch.backends.cpu.get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}; "
            f"{os.cpu_count()} cores; torch {torch.__version__}")


def summarize(requests, served: dict, direct: dict, rows_of: dict) -> dict:
    answers = served["answers"]
    ids = [rid for rid, _ in requests]
    lost = [rid for rid in ids if rid not in answers]
    duplicated = [rid for rid, outs in answers.items() if len(outs) != 1]
    unknown = [rid for rid in answers if rid not in rows_of]
    worst = max((rel_l2(answers[rid][0]["sample"], direct["outputs"][rid]) for rid in ids if rid in answers),
                default=float("nan"))
    calls = {}
    for outs in answers.values():
        info = outs[0]["info"]
        call = (info["replica"], tuple(info["batch_ids"]))     # one server call, whichever answer reports it
        calls[call] = (info["bucket_batch"], info["rows"], len(info["batch_ids"]))
    formed = collections.Counter(calls.values())
    total_rows = sum(rows_of.values())
    lat_s, lat_d = list(served["latencies"].values()), list(direct["latencies"].values())
    return {
        "requests": len(ids), "rows": total_rows,
        "served": {"wall_s": served["wall_s"], "rows_per_s": total_rows / served["wall_s"],
                   "requests_per_s": len(ids) / served["wall_s"], "p50_ms": 1e3 * percentile(lat_s, 50),
                   "p99_ms": 1e3 * percentile(lat_s, 99)},
        "direct": {"wall_s": direct["wall_s"], "rows_per_s": total_rows / direct["wall_s"],
                   "requests_per_s": len(ids) / direct["wall_s"], "p50_ms": 1e3 * percentile(lat_d, 50),
                   "p99_ms": 1e3 * percentile(lat_d, 99)},
        "formed_calls": {f"bucket {b} / rows {r} / requests {q}": n for (b, r, q), n in sorted(formed.items())},
        "lost": lost, "duplicated": duplicated, "unknown": unknown, "max_rel_l2_vs_direct": worst,
        "retried": sum(1 for outs in answers.values() if outs[0]["attempts"] > 1),
        "killed_replica": served["killed"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="a .pt2 or bucket folder (default: compile a tiny bundle, batch 1 and 2)")
    p.add_argument("--size", type=int, default=8, help="latent size of the compiled tiny bundle")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rows", default="1,2", help="request batch sizes to draw from")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--kill-after", type=int, default=None, help="ray.kill one replica after this many answers")
    p.add_argument("--direct-threads", type=int, default=1,
                   help="torch threads for the direct baseline (default 1, as each replica; 2 replicas use 2 cores)")
    p.add_argument("--json", help="write the record here")
    p.add_argument("--results-md", help="append a row to this Markdown table")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or not 1 <= args.replicas <= 8:
        p.error("--requests and --concurrency must be >= 1, --replicas 1..8")

    import compiled_unet
    from compiled_unet.serving import Batcher
    from compiled_unet.serving import deployment

    artifact = args.artifact or _tiny_bundle(args.size, tempfile.mkdtemp(prefix="serve_load_"))
    batcher = Batcher(compiled_unet.load(artifact))
    requests = make_requests(batcher, args.requests, [int(x) for x in args.rows.split(",")])
    rows_of = {rid: x["sample"].shape[0] for rid, x in requests}

    # The baseline first, before Ray's processes exist; warmed like the replicas (first calls cost more).
    torch.set_num_threads(args.direct_threads)
    run_direct(batcher, requests[:4])
    direct = run_direct(batcher, requests)

    deployment.start_ray(num_cpus=args.num_cpus)
    try:
        t0 = time.perf_counter()
        handle = deployment.run_local(artifact, replicas=args.replicas, port=_free_port(),
                                      batch_wait_timeout_s=args.batch_wait_ms / 1e3)
        startup = time.perf_counter() - t0
        run_served(handle, requests[: min(4, len(requests))], 2)     # warm both replicas (first-call costs)
        served = run_served(handle, requests, args.concurrency, args.kill_after)
    finally:
        deployment.shutdown()
    rec = summarize(requests, served, direct, rows_of)
    rec.update(machine=machine_line(), artifact=artifact, buckets=batcher.describe_buckets(), replicas=args.replicas,
               concurrency=args.concurrency, serve_startup_s=startup, direct_threads=args.direct_threads,
               batch_wait_ms=args.batch_wait_ms,
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(rec, indent=1, default=str))
    if args.json:
        from compiled_unet._atomic import write_atomic
        write_atomic(args.json, json.dumps(rec, indent=1, default=str))
    if args.results_md:
        from benchmarks._io import append_row_atomic
        s, d = rec["served"], rec["direct"]
        calls = "; ".join(f"{k}: {v}" for k, v in rec["formed_calls"].items())
        row = (f"| {rec['date']} | {args.replicas} | {rec['requests']} ({rec['rows']} rows, {args.rows}) | "
               f"{args.concurrency} | {'kill after ' + str(args.kill_after) if args.kill_after else '-'} | "
               f"{s['rows_per_s']:.1f} / {d['rows_per_s']:.1f} | {s['p50_ms']:.0f} / {d['p50_ms']:.0f} | "
               f"{s['p99_ms']:.0f} / {d['p99_ms']:.0f} | {calls} | {len(rec['lost'])} / {len(rec['duplicated'])} / "
               f"{rec['retried']} | {rec['max_rel_l2_vs_direct']:.1e} |")
        append_row_atomic(args.results_md, "", row)
    bad = rec["lost"] or rec["duplicated"] or rec["unknown"] or not rec["max_rel_l2_vs_direct"] <= 1e-6
    return 1 if bad else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
