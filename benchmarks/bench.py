"""Side-by-side UNet benchmark: one process, same weights and inputs, interleaved rounds after warm-up.

    python -m benchmarks.bench --preset sd15 --size 32 --batch 1 --device cpu
    python -m benchmarks.bench --smoke                      # tiny preset, seconds once Inductor's cache is warm
    compiled-unet bench --preset sd15 --size 64 --profile   # the same, from a source checkout

Variants (benchmarks/variants.py): diffusers eager (a), diffusers + the best torch.compile recipe for the
device (b), ours eager (c), ours compiled through `compiled_unet.compile` (d). Reports median/min/max ms,
speed-ups vs (a) and (b), cold and warm compile times, per-forward peak memory and relative L2 error vs the
baseline's fp32 output, in one table. Writes benchmarks/results/<date>-<preset>-<size>-b<batch>-<device>.json,
a PNG of the ratios next to it, and appends a row to benchmarks/RESULTS.md. Method: benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TAG = "BENCH_PROBE "

RESULTS_HEADER = """# Benchmark results

One row per run of `python -m benchmarks.bench` (appended by the tool; newest last). Times are medians over
interleaved rounds in one process on the same weights and inputs; speed-ups are `baseline ms / ours ms`
(> 1 = ours faster) for ours' fastest compiled variant. Cold compile = fresh Inductor cache. Method:
benchmarks/NOTES.md; full records (min/max, memory, options, machine): benchmarks/results/*.json.

| date | machine | case | baseline | eager ms | recipe ms | ours eager ms | ours compiled ms | vs eager | vs recipe | rel L2 (ours) | cold compile s (recipe / ours) | record |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="tiny, sd15, sd21, sdxl (default: sd15; --smoke: tiny)")
    p.add_argument("--size", type=int, default=None, help="latent height = width (default: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--variants", default=None,
                   help="comma list of: diffusers-eager (alias eager), diffusers-compile (alias recipe), ours-eager, "
                        "ours-<backend> for each compiled_unet backend (ours-inductor), ours-aot (AOTInductor package) "
                        "(default: all for the device; no ours-aot on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default 2; smoke 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; smoke 3)")
    p.add_argument("--inner", type=int, default=1, help="calls per timed sample (averaged; for ms-scale GPU calls)")
    p.add_argument("--compile-times", choices=("probe", "fresh", "reuse"), default=None,
                   help="probe: cold and warm compile each in a fresh subprocess (cold = empty Inductor cache, warm = "
                        "the cache the cold one filled), then this process compiles warm [default on CPU]. "
                        "fresh: this process compiles each variant once with an empty cache (cold only) [default on "
                        "CUDA]. reuse: compile once with the environment's TORCHINDUCTOR_CACHE_DIR (neither) [smoke]")
    p.add_argument("--warm-probes", type=int, default=3,
                   help="probe mode: warm compiles per variant, each a fresh process on the cold one's cache; the "
                        "median is the warm figure (this VM's page-fault cost moves between minutes) [3]")
    p.add_argument("--ours-options", default=None, help="JSON of InductorOptions fields for ours, e.g. '{\"freezing\": false}'")
    p.add_argument("--recipe-mode", default=None, help="torch.compile mode for the recipe instead of the device's "
                                                        "(default, reduce-overhead, max-autotune, ...)")
    p.add_argument("--recipe-config", default=None,
                   help="JSON of torch._inductor.config entries merged over the recipe's own (e.g. "
                        "'{\"coordinate_descent_tuning\": false}' when a device lease is short)")
    p.add_argument("--no-diffusers", action="store_true", help="baseline = our eager model even if diffusers is installed")
    p.add_argument("--profile", action="store_true", help="also print per-block / per-op times vs counted FLOPs and "
                                                          "the measured matmul peak")
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"), help="JSON and PNG folder")
    p.add_argument("--json", default=None, help="JSON path (default: OUT_DIR/<date>-<preset>-<size>-b<batch>-<device>.json)")
    p.add_argument("--results-md", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    p.add_argument("--no-record", action="store_true", help="do not append a row to RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="CI smoke: tiny preset at its 16x16 latent (the demo's "
                                                        "graph: Inductor's cache from the demo applies), 1 warm-up, 3 rounds, "
                                                        "compile-times reuse, no RESULTS.md row")
    p.add_argument("--max-rel-l2", type=float, default=None,
                   help="mark a variant failed (exit 1) when its relative L2 error vs the fp32 reference exceeds this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    # Internal: compile-time probes (run in a subprocess by --compile-times probe).
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-save", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-load", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device.lower()
    if args.smoke:
        args.preset = args.preset or "tiny"
        args.warmup = 1 if args.warmup is None else args.warmup
        args.rounds = 3 if args.rounds is None else args.rounds
        args.compile_times = args.compile_times or "reuse"
        args.no_record = True
    args.preset = args.preset or "sd15"
    args.warmup = 2 if args.warmup is None else args.warmup
    args.rounds = 10 if args.rounds is None else args.rounds
    args.compile_times = args.compile_times or ("fresh" if args.device.startswith("cuda") else "probe")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    from .variants import aliases

    known = aliases()
    for name in (args.variants or "").split(","):
        if name.strip() and name.strip() not in known:
            p.error(f"unknown variant {name.strip()!r}; expected some of {', '.join(sorted(known))}")
    if args.rounds < 1 or args.warmup < 0 or args.inner < 1 or args.warm_probes < 1:
        p.error("--rounds, --inner and --warm-probes must be >= 1, --warmup >= 0")
    return args


def _json(text: str | None) -> dict | None:
    return json.loads(text) if text else None


def _case_argv(args) -> list[str]:
    out = ["--preset", args.preset, "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype]
    if args.size:
        out += ["--size", str(args.size)]
    if args.ours_options:
        out += ["--ours-options", args.ours_options]
    if args.no_diffusers:
        out.append("--no-diffusers")
    if args.recipe_mode:
        out += ["--recipe-mode", args.recipe_mode]
    if args.recipe_config:
        out += ["--recipe-config", args.recipe_config]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def _fresh_cache_env(folder: str) -> None:
    """Point Inductor (and Triton) at `folder` and drop in-memory compile caches, so that the next compile
    in this process starts cold."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    try:
        from torch._inductor.utils import clear_caches

        clear_caches()
    except ImportError:
        pass


def _cpu_line(rec: dict) -> str:
    """'6.1 s (user 4.2 s, system 1.3 s, C++ compiler 0.0 s, 0.89 M page faults)' of a probe record."""
    cpu = rec.get("cpu") or {}
    if not cpu:
        return f"{rec['first_call_s']:.1f} s"
    return (f"{rec['first_call_s']:.1f} s (user {cpu['user_s']:.1f} s, system {cpu['sys_s']:.1f} s, C++ compiler "
            f"{cpu['children_user_s'] + cpu['children_sys_s']:.1f} s, {cpu['minor_faults'] / 1e6:.2f} M page faults)")


def _compiled(name: str) -> bool:
    return name not in ("diffusers-eager", "torch-eager", "ours-eager")


def run_probe(args, extra: list[str], cache_dir: str) -> dict:
    """Run this module in a fresh process with `cache_dir` as the Inductor cache; returns its probe record."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"),
               PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "benchmarks.bench", *_case_argv(args), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_TAG):
            rec = json.loads(line[len(PROBE_TAG):])
            rec["process_s"] = time.perf_counter() - t0
            return rec
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"probe {' '.join(extra)} failed (exit {proc.returncode}): {' | '.join(tail)}")


def probe_main(args) -> int:
    """Subprocess side of --compile-times probe: build one variant (or load an AOT package), print times."""
    import torch

    from .measure import PeakRss, rss_bytes
    from .variants import DTYPES, build, build_case

    device = torch.device(args.device)
    if args.probe_load:
        import compiled_unet
        from compiled_unet.presets import example_inputs

        sample, t, kw = example_inputs(args.preset, batch=args.batch, latent_size=args.size, dtype=DTYPES[args.dtype])
        t0 = time.perf_counter()
        loaded = compiled_unet.load(args.probe_load)
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            loaded(sample.to(device), t.to(device), **kw, return_dict=False)
        rec = {"load_s": load_s, "load_and_first_call_s": time.perf_counter() - t0,
               "rss_after_load_and_call": rss_bytes(), "package_bytes": os.path.getsize(args.probe_load)}
    else:
        # Only the model this variant compiles stays alive, so that the RSS before compiling is one model's.
        diffusers_model = not args.no_diffusers and args.probe in ("diffusers-compile", "torch-compile")
        case = build_case(args.preset, args.size, args.batch, device, DTYPES[args.dtype],
                          use_diffusers=diffusers_model, reference=False, log=lambda m: None)
        if diffusers_model and case.base is not case.ours:
            case.ours = None
        import gc

        gc.collect()
        model = case.base if diffusers_model else case.ours
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        with PeakRss() as rss:
            b = build(args.probe, case, _json(args.ours_options), args.recipe_mode,
                      recipe_config=_json(args.recipe_config))
        rec = {"first_call_s": b.first_call_s, "weight_bytes": weight_bytes, "rss_before_compile": rss.before,
               "rss_peak_compile": rss.peak, "rss_peak_sampled": rss.sampled_peak, "rss_peak_exact": rss.exact,
               "cpu": rss.cpu}
        if args.probe_save and b.name == "ours-aot":
            import compiled_unet

            compiled_unet.save(b.keep, args.probe_save)
    print(PROBE_TAG + json.dumps(rec), flush=True)
    return 0


RESULTS_HEADER_V2 = """
## Round 2: peak, compile time, compile memory (issue 14)

One row per run of `python -m benchmarks.bench` since issue 14 (appended by the tool). Medians of interleaved
rounds in one process; "peak" = the better of a 2048² sgemm and a packed 640-channel 3x3 conv measured in the
same run, just before and just after the timed rounds (benchmarks/measure.py `measured_peak`, `better_peak`;
rows up to 2026-12-05's fifth 32x32 row: before the rounds only); % of peak = counted FLOPs (FlopCounterMode, one eager
forward) / median time / peak. Compile times from fresh processes: cold = empty Inductor cache, warm = the
cache the cold one filled. Compile memory = (weights + RSS added while compiling) / weights, the model
counted once (raw process RSS peak / weights in the JSON record). Machine: CPU, torch's ISA, cpuinfo flags,
and any ISA cap the run set ("capped: ONEDNN_MAX_CPU_ISA=AVX2 ...": AVX2 kernels on an AVX-512 CPU). "roofline: at
most N%" (rows from 2026-12-05's seventeenth session on): the best % of peak one forward could reach if each
convolution, linear and attention took max(its FLOPs / peak, its weights' bytes / the run's measured read
bandwidth) (benchmarks/roofline.py).

| date | machine | case | eager ms | recipe ms | ours ms | vs eager | vs recipe | peak GFLOP/s (mm / conv) | % of peak: recipe / ours | rel L2 | cold s: recipe / ours (ratio) | warm s: recipe / ours (ours warm/cold) | compile memory x weights: recipe / ours | record |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(record: dict) -> str:
    lines = [f"{record['case']['describe']} | baseline: {record['baseline']} | {record['machine_line']}",
             f"{'variant':18s} {'median ms':>10s} {'min-max ms':>17s} {'vs eager':>8s} {'vs recipe':>9s} "
             f"{'cold s':>7s} {'warm s':>7s} {'first s':>7s} {'peak MB':>8s} {'rel L2':>8s} {'%peak':>6s} {'mem x':>6s}"]
    for v in record["variants"]:
        if v.get("error"):
            lines.append(f"{v['name']:18s} FAILED: {v['error'][:100]}")
            continue
        lines.append(
            f"{v['name']:18s} {v['median_ms']:10.2f} {v['min_ms']:8.2f}-{v['max_ms']:<8.2f} "
            f"{_ratio(v['speedup_vs_eager']):>8s} {_ratio(v['speedup_vs_recipe']):>9s} "
            f"{_fmt(v['compile_cold_s'], '7.1f'):>7s} {_fmt(v['compile_warm_s'], '7.1f'):>7s} "
            f"{_fmt(v['first_call_s'], '7.1f'):>7s} {_fmt(v['peak_forward_bytes'] and v['peak_forward_bytes'] / 2**20, '8.1f'):>8s} "
            f"{_fmt(v['rel_l2_err'], '8.1e'):>8s} {_fmt(v.get('percent_of_peak'), '5.1f'):>6s} "
            f"{_fmt((v.get('compile_memory') or {}).get('peak_x_weights'), '6.2f'):>6s}")
    if record.get("peak"):
        lines.append(f"peak {record['peak']['gflops']:.0f} GFLOP/s ({record['peak']['method']}); one forward "
                     f"{record['flops'] / 1e9:.1f} GFLOP; mem x = compile peak host memory / weights (model counted once)")
    if record.get("roofline"):
        r = record["roofline"]
        best = [v for v in record["variants"] if v.get("percent_of_roofline")]
        best = max(best, key=lambda v: v["percent_of_roofline"], default=None)
        lines.append(f"roofline (benchmarks/roofline.py): weights read at {r['read_gbytes_per_s']:.1f} GB/s; at least "
                     f"{r['per_layer_ms']:.0f} ms layer by layer = at most {r['best_percent_of_peak']['per_layer']:.1f}% "
                     f"of peak ({r['overlapped_ms']:.0f} ms / {r['best_percent_of_peak']['overlapped']:.1f}% overlapped)"
                     + (f"; {best['name']} at {best['percent_of_roofline']:.1f}% of the per-layer bound" if best else ""))
    lines.append(f"speed-up = role ms / variant ms (eager: {record['roles'].get('a')}, recipe: {record['roles'].get('b')}); "
                 f"rel L2 vs {record['error_reference']}; peak MB: {record['memory_method']}")
    return "\n".join(lines)


def _unused_path(path: str) -> str:
    """`path`, or with -2, -3 ... before the extension when a record of that name exists."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}{ext}"
    return path


def _results_row(record: dict, json_path: str) -> str:
    by = {v["name"]: v for v in record["variants"] if not v.get("error")}
    roles = record["roles"]
    a, b = by.get(roles.get("a") or ""), by.get(roles.get("b") or "")
    ours = [v for v in by.values() if v["role"] == "d"]
    # The row speaks for the default compile (jit) when it ran: its compile time, memory and warm start are what
    # `compiled_unet.compile` users get; the AOT package's figures are in the record and the printed table.
    best = by.get("ours-inductor") or (min(ours, key=lambda v: v["median_ms"]) if ours else None)
    peak = record.get("peak") or {}
    roof = record.get("roofline")

    def ms(v):
        return f"{v['median_ms']:.1f}" if v else "-"

    def pct(v):
        return _fmt(v and v.get("percent_of_peak"), ".0f") + ("%" if v and v.get("percent_of_peak") else "")

    def mem(v):
        m = v and v.get("compile_memory")
        return _fmt(m and m["peak_x_weights"], ".2f")

    cold_ratio = (best["compile_cold_s"] / b["compile_cold_s"] if best and b and best.get("compile_cold_s")
                  and b.get("compile_cold_s") else None)
    warm_ratio = (best["compile_warm_s"] / best["compile_cold_s"] if best and best.get("compile_warm_s")
                  and best.get("compile_cold_s") else None)
    cells = [record["date"], record["machine_line"], record["case"]["describe"], ms(a), ms(b),
             f"{ms(best)} ({best['name']})" if best else "-",
             _ratio(best and best["speedup_vs_eager"]), _ratio(best and best["speedup_vs_recipe"]),
             f"{_fmt(peak.get('matmul', {}).get('gflops'), '.0f')} / {_fmt(peak.get('conv3x3', {}).get('gflops'), '.0f')}",
             f"{pct(b)} / {pct(best)}" + (f" (roofline: at most {roof['best_percent_of_peak']['per_layer']:.0f}%)"
                                          if roof else ""), _fmt(best and best["rel_l2_err"], ".1e"),
             f"{_fmt(b and b.get('compile_cold_s'), '.0f')} / {_fmt(best and best.get('compile_cold_s'), '.0f')} "
             f"({_ratio(cold_ratio)})",
             f"{_fmt(b and b.get('compile_warm_s'), '.0f')} / {_fmt(best and best.get('compile_warm_s'), '.0f')} "
             f"({_ratio(warm_ratio)})",
             f"{mem(b)} / {mem(best)}", os.path.relpath(json_path, os.path.dirname(record["_md"]))]
    return "| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe or args.probe_load:
        return probe_main(args)
    import torch

    from . import measure, plot, variants
    from ._io import append_row_atomic, write_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but CUDA is not available")
        return 2
    if args.dtype not in variants.DTYPES:
        log(f"error: unknown --dtype {args.dtype!r}; expected one of {sorted(variants.DTYPES)}")
        return 2
    overrides = _json(args.ours_options)
    info = measure.machine(device)
    if info.get("load_avg_1m", 0) > 0.5 * (info["cores"] or 1):
        log(f"WARNING: load average {info['load_avg_1m']:.1f} on {info['cores']} cores: timings will be noisy")
    started = time.time()
    requested = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else None
    names = variants.resolve_names(requested, variants.diffusers_available(not args.no_diffusers), device)
    log(f"variants: {', '.join(names)}")

    scratch = tempfile.mkdtemp(prefix="bench_")
    built: dict[str, variants.Built] = {}
    rows: dict[str, dict] = {}
    caches: dict[str, str] = {}
    packages: dict[str, str] = {}
    try:
        for name in names:
            rows[name] = {"name": name, "compile_cold_s": None, "compile_warm_s": None, "first_call_s": None,
                          "load_s": None, "held_bytes": None, "error": None}
        # Probes first, before this process builds any model: an SD1.5 AOT compile peaks at ~14 GB, which next to
        # the variants' weights would not fit a 24 GB machine; and a compile measured beside this process's eager
        # models (~3.4-7 GB) measures the machine's memory pressure as much as the compile (on a VM whose first
        # touch of memory beyond ~5 GB ran 20x slower, the warm probes took 14-21 s instead of 5-7 s: NOTES.md).
        for name in (n for n in names if _compiled(n) and args.compile_times == "probe"):
            row = rows[name]
            try:
                cache = caches[name] = tempfile.mkdtemp(prefix=f"inductor_{name}_", dir=scratch)
                pkg = os.path.join(scratch, f"{name}.pt2")
                extra = ["--probe", name] + (["--probe-save", pkg] if name == "ours-aot" else [])
                log(f"[{name}] cold compile in a fresh process (empty Inductor cache) ...")
                rec = run_probe(args, extra, cache)
                row["compile_cold_s"], row["compile_cold_cpu"] = rec["first_call_s"], rec.get("cpu")
                log(f"[{name}] cold: {_cpu_line(rec)}")
                if rec.get("weight_bytes"):
                    w, before, peak = rec["weight_bytes"], rec["rss_before_compile"], rec["rss_peak_compile"]
                    # Peak host memory of compiling, counting the model once: weights + what compiling added.
                    row["compile_memory"] = {"weight_bytes": w, "rss_before": before, "rss_peak": peak,
                                             "peak_x_weights": (w + peak - before) / w, "rss_peak_x_weights": peak / w,
                                             "peak_is_high_water_mark": rec.get("rss_peak_exact"),
                                             "sampled_peak_x_weights": (w + rec["rss_peak_sampled"] - before) / w}
                log(f"[{name}] warm compile in a fresh process (x{args.warm_probes}) ...")
                warm = [run_probe(args, extra, cache) for _ in range(args.warm_probes)]
                runs = [r["first_call_s"] for r in warm]
                row["compile_warm_runs_s"], row["compile_warm_s"] = runs, statistics.median(runs)
                row["compile_warm_cpu"] = [r.get("cpu") for r in warm]
                log(f"[{name}] warm: " + "; ".join(_cpu_line(r) for r in warm))
                if name == "ours-aot":
                    # Fresh processes: a byte copy made outside compiled_unet (a file from elsewhere: its checksums
                    # are read), the saved file's first load (save vouched for its copy), then a restart
                    # (compiled_unet's library cache; backends/aoti_library.py).
                    elsewhere = os.path.join(scratch, "copied-" + os.path.basename(pkg))
                    shutil.copyfile(pkg, elsewhere)
                    row["load_copied_s"] = run_probe(args, ["--probe-load", elsewhere], cache)["load_s"]
                    os.remove(elsewhere)
                    rec = run_probe(args, ["--probe-load", pkg], cache)
                    row["load_first_s"] = rec["load_s"]
                    rec = run_probe(args, ["--probe-load", pkg], cache)
                    row["load_s"], row["load_and_first_call_s"] = rec["load_s"], rec["load_and_first_call_s"]
                    row["loaded_rss_bytes"], row["package_bytes"] = rec["rss_after_load_and_call"], rec["package_bytes"]
                    packages[name] = pkg  # this process loads it instead of compiling a third time
            except Exception as e:
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                log(f"[{name}] FAILED: {row['error']}")
        case = variants.build_case(args.preset, args.size, args.batch, device, variants.DTYPES[args.dtype],
                                   use_diffusers=not args.no_diffusers, log=log)
        log(f"case: {case.describe()}; baseline: {case.baseline}")
        for name in names:
            row = rows[name]
            compiled = _compiled(name)
            if row["error"]:
                continue
            try:
                if name in caches:
                    _fresh_cache_env(caches[name])  # this process compiles warm from the probes' cache
                elif compiled and args.compile_times == "fresh":
                    _fresh_cache_env(tempfile.mkdtemp(prefix=f"inductor_{name}_", dir=scratch))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated(device)
                log(f"[{name}] " + ("loading the probe's package" if name in packages else
                                    "building" + (" (compiling)" if compiled else "")))
                b = built[name] = variants.build(name, case, overrides, args.recipe_mode, package=packages.get(name),
                                                 recipe_config=_json(args.recipe_config))
                row.update(role=b.role, label=b.label, first_call_s=b.first_call_s, options=b.options)
                if b.load_s is not None and row["load_s"] is None:
                    row["load_s"] = b.load_s
                if compiled and args.compile_times == "fresh":
                    row["compile_cold_s"] = b.first_call_s
                if compiled:
                    log(f"[{name}] first call after {b.first_call_s:.1f} s")
                with torch.no_grad():
                    for _ in range(args.warmup):
                        b.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    row["held_bytes"] = int(torch.cuda.memory_allocated(device) - before)
            except Exception as e:  # one failing variant must not lose the others' numbers
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                built.pop(name, None)
                log(f"[{name}] FAILED: {row['error']}")

        # Error vs the fp32 reference, and per-forward peak memory.
        for name, b in built.items():
            with torch.no_grad():
                out = b.fn().float().cpu().clone()
            rows[name]["rel_l2_err"] = err = measure.rel_l2(out, case.ref)
            if args.max_rel_l2 is not None and not err <= args.max_rel_l2:  # NaN fails too
                rows[name]["error"] = f"relative L2 error {err:.2e} > --max-rel-l2 {args.max_rel_l2:g}"
                log(f"[{name}] FAILED: {rows[name]['error']}")
            rows[name]["peak_forward_bytes"] = measure.peak_forward_bytes(b.fn, device)

        peak = flops = None
        if not args.smoke:
            from .profiling import count_flops

            flops = count_flops(case.ours, lambda: case.ours(case.sample, case.timestep, **case.kwargs,
                                                             return_dict=False))[0]
            peak = measure.measured_peak(device, case.dtype)
            log(f"peak: {peak['gflops']:.0f} GFLOP/s ({peak['method']}); one forward {flops / 1e9:.1f} GFLOP")
        log(f"timing: {args.rounds} interleaved rounds x {len(built)} variants")
        times = measure.time_rounds({n: b.fn for n, b in built.items()}, args.rounds, device, args.inner)
        if peak:
            peak = measure.better_peak(peak, measure.measured_peak(device, case.dtype))
            log(f"peak after the rounds: {peak['after_gflops']:.0f} GFLOP/s; the run's peak: {peak['gflops']:.0f}")
        for name, secs in times.items():
            rows[name].update(measure.summarize(secs), times_ms=[s * 1e3 for s in secs])

        roofline = None
        if peak and device.type == "cpu":
            from . import roofline as rl

            bandwidth = rl.read_bandwidth()
            roofline = rl.bounds(rl.matmul_ops(case.ours, lambda: case.ours(case.sample, case.timestep, **case.kwargs,
                                                                            return_dict=False)),
                                 peak["gflops"], bandwidth["gbytes_per_s"])
            log(f"roofline: weights read at {bandwidth['gbytes_per_s']:.1f} GB/s; one forward needs at least "
                f"{roofline['per_layer_ms']:.0f} ms layer by layer (best {roofline['best_percent_of_peak']['per_layer']:.1f}% "
                f"of peak), {roofline['overlapped_ms']:.0f} ms overlapped, {roofline['compute_ms']:.0f} ms at the peak")
        if peak:
            for name in times:
                row = rows[name]
                row["gflops"] = flops / (row["median_ms"] / 1e3) / 1e9
                row["percent_of_peak"] = 100 * row["gflops"] / peak["gflops"]
                if roofline:
                    row["percent_of_roofline"] = 100 * roofline["per_layer_ms"] / row["median_ms"]
        roles = {r: next((n for n, b in built.items() if b.role == r), None) for r in "ab"}
        for row in rows.values():
            for key, role in (("speedup_vs_eager", "a"), ("speedup_vs_recipe", "b")):
                ref = rows.get(roles[role] or "")
                row[key] = (ref["median_ms"] / row["median_ms"]
                            if ref and "median_ms" in ref and "median_ms" in row else None)

        profile = None
        if args.profile:
            profile = __import__("benchmarks.profiling", fromlist=["run"]).run(
                case, built, {n: rows[n]["median_ms"] for n in built}, iters=args.profile_iters, log=log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    date = datetime.date.today().isoformat()
    device_tag = "cuda" if device.type == "cuda" else "cpu"
    # One machine's record must not replace another's (AVX2 and AVX-512 runs on one day): the ISA is in the name.
    file_tag = device_tag + ("-" + torch.backends.cpu.get_cpu_capability().lower() if device_tag == "cpu" else "")
    json_path = args.json or _unused_path(
        os.path.join(args.out_dir, f"{date}-{args.preset}-{case.size}-b{args.batch}-{file_tag}.json"))
    order = ["name", "role", "label", "median_ms", "min_ms", "max_ms", "n", "speedup_vs_eager", "speedup_vs_recipe",
             "compile_cold_s", "compile_warm_s", "first_call_s", "load_s", "peak_forward_bytes", "held_bytes",
             "rel_l2_err", "error"]
    record = {
        "date": date, "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "wall_s": time.time() - started, "machine": info, "machine_line": measure.describe(info),
        "case": {"preset": args.preset, "size": case.size, "batch": args.batch, "device": device_tag,
                 "dtype": args.dtype, "describe": case.describe()},
        "baseline": case.baseline, "roles": roles,
        "recipe": variants.recipe_for(device, args.recipe_mode, _json(args.recipe_config)),
        "settings": {"warmup": args.warmup, "rounds": args.rounds, "inner": args.inner,
                     "compile_times": args.compile_times, "ours_options": overrides},
        "error_reference": f"{'diffusers' if case.has_diffusers else 'ours'} eager, float32, same weights and inputs",
        "memory_method": measure.MEMORY_METHOD[device_tag],
        "variants": [{**{k: row.get(k) for k in order}, **{k: v for k, v in row.items() if k not in order}}
                     for row in rows.values()],
        "profile": profile, "peak": peak, "flops": flops, "roofline": roofline,
    }
    for row in record["variants"]:
        if row.get("role") is None:
            row["role"] = variants.aliases().get(row["name"])
    log("")
    log(table(record))
    write_atomic(json_path, json.dumps(record, indent=1, default=str) + "\n")
    png = os.path.splitext(json_path)[0] + ".png"
    series = [f"vs {roles['a'] or 'eager'}", f"vs {roles['b'] or 'recipe'}"]
    ok = [v for v in record["variants"] if not v.get("error") and "median_ms" in v]
    try:  # matplotlib (the explorer extra) may be missing on a bare GPU machine: the record still counts
        write_atomic(png, plot.ratio_chart(f"{case.describe()}: speed-up (median)",
                                           [(v["name"], [v["speedup_vs_eager"], v["speedup_vs_recipe"]]) for v in ok],
                                           series))
    except ImportError as e:
        png = f"not drawn ({e})"
    log(f"record: {json_path}\nplot:   {png}")
    if not args.no_record:
        record["_md"] = os.path.abspath(args.results_md)
        append_row_atomic(args.results_md, RESULTS_HEADER_V2, _results_row(record, os.path.abspath(json_path)))
        log(f"row appended to {args.results_md}")
    return 1 if any(v.get("error") for v in record["variants"]) else 0


if __name__ == "__main__":
    sys.exit(main())
