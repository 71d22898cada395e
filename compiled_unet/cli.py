"""`compiled-unet` command line. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter


class UserError(Exception):
    pass


def _timeit(fn, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cmd_demo(args) -> int:
    import torch

    from . import compile as compile_unet, export, save
    from .presets import build_random, example_inputs, preset

    preset(args.preset)  # validate before printing progress
    print(f"[1/5] building preset {args.preset!r} with random weights", flush=True)
    model = build_random(args.preset)
    n_params = sum(p.numel() for p in model.parameters())
    sample, timestep, kwargs = example_inputs(args.preset, batch=args.batch, latent_size=args.size)
    print(f"      {n_params / 1e6:.2f} M parameters; sample {tuple(sample.shape)}", flush=True)

    print("[2/5] exporting with torch.export (one static graph)", flush=True)
    t0 = time.perf_counter()
    ep = export(model, sample, timestep, **kwargs)
    ops = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    print(f"      {sum(ops.values())} ops in {time.perf_counter() - t0:.1f} s; most common: "
          + ", ".join(f"{k.split('.')[1] if '.' in k else k} x{v}" for k, v in ops.most_common(5)), flush=True)

    print("[3/5] passes + Inductor compile (minutes on a small CPU; cached afterwards)", flush=True)
    t0 = time.perf_counter()
    compiled = compile_unet(ep, sample, timestep, config=model.config, **kwargs)
    changed = ", ".join(f"{k} {v}" for k, v in compiled.report.rewrites.items() if v)
    print(f"      compiled in {time.perf_counter() - t0:.1f} s; rewrites: {changed}", flush=True)

    print("[4/5] checking exported and compiled graphs against eager", flush=True)
    exported = ep.module()
    with torch.no_grad():
        ref = model(sample, timestep, **kwargs).sample
        out_exported = exported(sample, timestep, **kwargs, return_dict=False)[0]
    out_compiled = compiled(sample, timestep, **kwargs).sample
    scale = max(1.0, ref.abs().max().item())
    err_exported = (out_exported - ref).abs().max().item() / scale
    err_compiled = (out_compiled - ref).abs().max().item() / scale
    ok = err_exported <= 1e-5 and err_compiled <= 1e-4
    print(f"      max-abs error / output scale: exported {err_exported:.1e} (tolerance 1e-5), compiled "
          f"{err_compiled:.1e} (tolerance 1e-4): {'OK' if ok else 'MISMATCH'}", flush=True)

    print(f"[5/5] timing {args.repeats} forwards each (median)", flush=True)
    with torch.no_grad():
        eager_t = _timeit(lambda: model(sample, timestep, **kwargs), args.repeats)
        comp_t = _timeit(lambda: compiled(sample, timestep, **kwargs), args.repeats)
    eager_ms, comp_ms = statistics.median(eager_t) * 1e3, statistics.median(comp_t) * 1e3
    print()
    print(f"{'preset':8s} {'eager ms':>10s} {'compiled ms':>12s} {'speed-up':>9s} {'rel err':>9s}")
    print(f"{args.preset:8s} {eager_ms:10.1f} {comp_ms:12.1f} {eager_ms / comp_ms:8.2f}x {err_compiled:9.1e}")
    if args.artifact:
        print(f"\nwriting the AOTInductor artifact (one more compile) ...", flush=True)
        path = save(compiled, args.artifact)
        print(f"artifact: {path}  (serve it with: compiled-unet run {path})")
    return 0 if ok else 1


def _model_from_args(args):
    """(model, (sample, timestep, kwargs)) from --checkpoint DIR or --preset NAME."""
    from .presets import build_random, example_inputs, example_inputs_for_config, preset

    if getattr(args, "checkpoint", None):

        from .unet import UNet2DConditionModel
        if not os.path.isdir(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint!r}: no such folder (expected diffusers' unet layout)")
        model = UNet2DConditionModel.from_pretrained(args.checkpoint)
        c = model.config
        size = args.size or (c.sample_size if isinstance(c.sample_size, int) else 64)
        inputs = example_inputs_for_config(c, args.batch, size, size)
        return model, (inputs.pop("sample"), inputs.pop("timestep"), inputs)
    preset(args.preset)
    return build_random(args.preset), example_inputs(args.preset, batch=args.batch, latent_size=args.size)


def cmd_inspect(args) -> int:

    import torch

    from . import export
    from .inspect_graph import block_svg, inspect_program

    if args.profile_repeats < 1:  # checked before the (slow) export
        raise UserError(f"--profile-repeats {args.profile_repeats}: expected a positive integer")
    if args.artifact:
        return _inspect_artifact(args)
    if args.program:
        if not os.path.isfile(args.program):
            raise UserError(f"--program {args.program!r}: no such file (expected a torch.export.save'd program)")
        try:
            ep = torch.export.load(args.program)
        except Exception as e:  # noqa: BLE001 - any load failure is a user-facing bad file
            raise UserError(f"--program {args.program!r}: not a loadable exported program ({type(e).__name__})")
        title = os.path.basename(args.program)
    else:
        model, (sample, timestep, kwargs) = _model_from_args(args)
        if args.freeu:
            try:
                s1, s2, b1, b2 = (float(v) for v in args.freeu.split(","))
            except ValueError:
                raise UserError(f"--freeu {args.freeu!r}: expected four numbers s1,s2,b1,b2 (e.g. 0.9,0.2,1.2,1.4)")
            model.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
        ep = export(model, sample, timestep, **kwargs)
        title = args.checkpoint or args.preset
    pass_report = None
    views = None
    if args.html or args.explorer or args.explorer_out or args.profile:  # compiled_unet.views (issue 13)
        from . import views as views_mod
        views = views_mod.build(ep, title, passes=None if args.passes else [], profile=args.profile,
                                repeats=args.profile_repeats)
        if args.passes:
            ep, pass_report = views.optimized, views.pass_report
    elif args.passes:
        from . import passes
        ep, pass_report = passes.optimize(ep)
    report = inspect_program(ep, pass_report)
    print(report.to_json() if args.format == "json" else report.text())
    note = (lambda m: print(m, file=sys.stderr)) if args.format == "json" else print
    if args.svg:
        from ._atomic import write_atomic

        write_atomic(args.svg, block_svg(report, title=f"{title}{' (optimized)' if args.passes else ''}"))
        note(f"\nblock picture written to {args.svg}")
    if views is not None:
        _write_views(args, views, note)
    return 0


def _inspect_artifact(args) -> int:
    """What a compiled `.pt2` package says of itself (read from its document: no load, no model source): inputs,
    options, size, torch, and the pass report its compile recorded."""
    import json

    from .backends.inductor import read_package_doc
    from .errors import DamagedArtifact
    from .runtime.compiled import report_from_doc
    from .runtime.signature import Signature

    if not os.path.isfile(args.artifact):
        raise UserError(f"--artifact {args.artifact!r}: no such file (expected a .pt2 package written by "
                        f"compiled_unet.save or compiled with aot=True)")
    try:
        doc = read_package_doc(args.artifact)
        signature, report = Signature.from_json(doc["signature"]), report_from_doc(doc)
    except DamagedArtifact as e:
        raise UserError(f"--artifact: {e}")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--artifact {args.artifact!r}: damaged artifact document ({type(e).__name__}: {e})")
    size = os.path.getsize(args.artifact)
    summary = {"format": doc.get("format"), "torch": doc.get("torch"), "inputs": signature.describe(),
               "options": doc.get("options"), "package_bytes": size, "fused_qkv": doc.get("fused_qkv"),
               "freeu": doc.get("freeu"), "passes": None if report is None else report.rewrites}
    if args.format == "json":
        print(json.dumps(summary, indent=1))
        return 0
    options = ", ".join(f"{k}={v}" for k, v in (doc.get("options") or {}).items() if v not in (None, False))
    print(f"{args.artifact}: {doc.get('format')} (torch {doc.get('torch')}), {size / 2**20:.1f} MiB\n"
          f"inputs:  {summary['inputs']}\noptions: {options or '-'}")
    print("passes:" + (" not recorded (a saved jit graph, a compile with passes=None, or an older package)"
                       if report is None else "\n" + report.table()))
    return 0


def _write_views(args, views, note) -> None:
    """--html, --explorer-out, --explorer of `inspect` (compiled_unet.views)."""
    from . import views as views_mod

    try:
        if args.html:
            note(f"HTML report written to {views_mod.write_html(views, args.html)}")
        if args.explorer_out and not args.explorer:  # (--explorer writes the folder itself)
            views_mod.write_explorer(views, args.explorer_out)
            note(f"Model Explorer files written to {args.explorer_out}; serve them with "
                 f"`python -m compiled_unet.views.explorer {args.explorer_out}`")
        if args.explorer:
            views_mod.explore(views, out_dir=args.explorer_out or None, port=args.port, open_browser=True)
    except ImportError as e:  # an optional extra (explorer: model explorer, matplotlib) is not installed
        raise UserError(str(e))



def _parse_shapes(text: str) -> list:
    """'1x64x64,2x64x96' -> [(1, 64, 64), (2, 64, 96)] (batch x height x width of the latent)."""
    shapes = []
    for part in text.split(","):
        try:
            b, h, w = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise UserError(f"--shapes {text!r}: expected BATCHxHEIGHTxWIDTH[,...], e.g. 1x64x64,2x64x64")
        if min(b, h, w) < 1:
            raise UserError(f"--shapes {text!r}: sizes must be positive")
        shapes.append((b, h, w))
    return shapes


def _model_for_compile(args):
    if args.checkpoint:

        from .unet import UNet2DConditionModel
        if not os.path.isdir(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint!r}: no such folder (expected diffusers' unet layout)")
        return UNet2DConditionModel.from_pretrained(args.checkpoint)
    from .presets import build_random, preset
    preset(args.preset)
    return build_random(args.preset)


def cmd_compile(args) -> int:
    import time

    from .presets import example_inputs_for_config, preset

    shapes = _parse_shapes(args.shapes)
    if args.backend not in ("inductor", "xla"):
        raise UserError(f"--backend {args.backend!r}: expected inductor or xla")
    if args.backend == "xla" and args.freezing is not None:
        raise UserError("--freezing/--no-freezing: an inductor option; the xla backend takes none")
    if args.backend == "xla" and len(shapes) != 1:
        raise UserError("--backend xla: one shape per StableHLO artifact (give one --shapes entry)")
    if args.backend == "xla":
        from .backends import xla
        if not xla.available():
            raise UserError("XLA environment missing: run bash scripts/env_xla.sh, then .venv-xla/bin/compiled-unet")
    model = _model_for_compile(args)
    seq = args.seq or (preset(args.preset).seq_len if not args.checkpoint else 77)
    examples = [example_inputs_for_config(model.config, b, h, w, seq_len=seq, seed=i)
                for i, (b, h, w) in enumerate(shapes)]
    print(f"[compile] {len(shapes)} shape(s) {args.shapes} with {args.backend}; this takes minutes on a CPU",
          flush=True)
    t0 = time.perf_counter()
    progress = False if args.quiet else None    # None: a status line when stderr is a terminal
    from . import compile as compile_unet, save
    if args.backend == "xla":
        ex = dict(examples[0])
        compiled = compile_unet(model, ex.pop("sample"), ex.pop("timestep"), backend="xla", progress=progress, **ex)
    else:
        from .backends import InductorOptions
        options = InductorOptions(aot=True, freezing=args.freezing)
        if len(shapes) == 1:
            ex = dict(examples[0])
            # The model is ours and only the package is kept: its weights are freed as the compile packs them
            # (SD1.5 packaging peaks at ~2x the weights instead of ~3x; the package is the same).
            compiled = compile_unet(model, ex.pop("sample"), ex.pop("timestep"), options=options, progress=progress,
                                    donate_weights=True, **ex)
        else:
            from .buckets import compile_buckets
            compiled = compile_buckets(model, examples, options=options, progress=progress)
    save(compiled, args.output)
    size = (sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.output) for f in fs)
            if os.path.isdir(args.output) else os.path.getsize(args.output))
    print(f"[compile] done in {time.perf_counter() - t0:.1f} s; artifact: {args.output} ({size / 2**20:.1f} MiB)")
    return 0


def _inputs_from_file(path: str, signature):
    """Tensors from a .safetensors file named like the signature's leaves (sample, timestep,
    encoder_hidden_states, "added_cond_kwargs['text_embeds']", ...); every leaf must be there."""

    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"--inputs {path!r}: no such file (expected a .safetensors of input tensors)")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is a user error
        raise UserError(f"--inputs {path!r}: not a readable .safetensors file ({type(e).__name__})")
    names = [leaf.name for leaf in signature.leaves if leaf.is_tensor and not leaf.name.startswith("freeu_scales")]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"--inputs {path!r}: missing tensors {missing}; the artifact takes {names}")
    return signature.structure([tensors.get(leaf.name) if leaf.is_tensor else leaf.value for leaf in signature.leaves])


def cmd_run(args) -> int:
    import time

    import torch

    if not os.path.exists(args.artifact):
        raise UserError(f"{args.artifact!r}: no such artifact (a .pt2 from `compiled-unet compile`, a bucket folder "
                        f"or a StableHLO folder)")
    from . import load
    loaded = load(args.artifact)  # a damaged or foreign artifact: a ValueError naming the path
    targets = getattr(loaded, "buckets", [loaded])
    outputs = {}
    for i, target in enumerate(targets):
        if args.inputs:
            call_args, call_kwargs = _inputs_from_file(args.inputs, target.signature)
        else:
            call_args, call_kwargs = target.signature.random_inputs(seed=i)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = loaded(*call_args, **call_kwargs).sample
            times.append(time.perf_counter() - t0)
        outputs[f"sample_{i}" if len(targets) > 1 else "sample"] = out.contiguous()
        print(f"shape {tuple(call_args[0].shape)} -> {tuple(out.shape)} {str(out.dtype).replace('torch.', '')}: "
              f"median {sorted(times)[len(times) // 2] * 1e3:.1f} ms over {args.repeats} call(s)")
        if args.inputs:
            break
    if args.output:
        from safetensors.torch import save as save_tensors

        from ._atomic import write_atomic
        write_atomic(args.output, save_tensors({k: v.cpu() for k, v in outputs.items()}))
        print(f"outputs written to {args.output}")
    return 0


# ---- serve: Ray Serve replicas of a saved artifact (compiled_unet.serving; Ray is the optional extra) ------
def cmd_serve(args) -> int:
    import time

    if not os.path.exists(args.artifact):
        raise UserError(f"{args.artifact!r}: no such artifact (a .pt2 or a bucket folder from `compiled-unet compile`)")
    if args.replicas < 1:
        raise UserError(f"--replicas {args.replicas}: must be >= 1")
    try:
        from .serving import deployment
    except ImportError as e:
        raise UserError(f"serve needs Ray Serve: pip install 'compiled_unet[serve]' ({e})")
    deployment.run_local(args.artifact, replicas=args.replicas, port=args.port, host=args.host, address=args.address,
                         num_cpus=args.num_cpus, batch_wait_timeout_s=args.batch_wait_ms / 1e3,
                         torch_threads=args.threads,
                         num_cpus_per_replica=0.5 if args.threads <= 1 else float(args.threads))
    print(f"serving {args.artifact} with {args.replicas} replica(s) on http://{args.host}:{args.port}/ "
          f"(POST safetensors bytes; see compiled_unet/serving/wire.py). Ctrl-C stops.", flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it as Ctrl-C does: Serve and Ray shut down
    try:
        while True:
            time.sleep(3600)
    finally:
        deployment.shutdown()
# ---- end serve -----------------------------------------------------------------------------------------


# ---- bench: a thin call into benchmarks/bench.py (the benchmark suite's own code and options) ----------
def cmd_bench(argv: list) -> int:
    """`compiled-unet bench ARGS` == `python -m benchmarks.bench ARGS`; benchmarks/ lives in the source checkout."""

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "bench.py")):
        raise UserError("bench runs from a source checkout (benchmarks/ is not part of the installed package)")
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.bench import main as bench_main

    return bench_main(argv)
# ---- end bench -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # all of its arguments belong to benchmarks.bench
        try:
            return cmd_bench(argv[1:])
        except UserError as e:
            print(f"compiled-unet: error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="compiled-unet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="preset UNet -> export -> passes -> compile -> parity -> timing -> artifact")
    demo.add_argument("--preset", default="tiny", help="tiny (default), sd15, sd21, sdxl")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--size", type=int, default=None, help="latent height = width (default: the preset's)")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--artifact", default="artifacts/demo.pt2", help="where to write the .pt2 (default: %(default)s)")
    demo.add_argument("--no-artifact", dest="artifact", action="store_const", const=None, help="skip the artifact")
    demo.set_defaults(fn=cmd_demo)

    comp = sub.add_parser("compile", help="preset or checkpoint + shapes + backend -> artifact (.pt2, bucket folder, StableHLO)")
    src = comp.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny (default), sd15, sd21, sdxl")
    src.add_argument("--checkpoint", help="a diffusers-layout unet folder")
    comp.add_argument("--shapes", default="1x16x16", help="latent BATCHxHEIGHTxWIDTH, comma-separated for buckets")
    comp.add_argument("--seq", type=int, default=None, help="text tokens (default: the preset's, 77 for checkpoints)")
    comp.add_argument("--backend", default="inductor", help="inductor (AOTInductor .pt2 / bucket folder) or xla")
    comp.add_argument("-o", "--output", required=True, help="artifact path (.pt2 file, or a folder for buckets/xla)")
    comp.add_argument("--freezing", action=argparse.BooleanOptionalAction, default=None,
                      help="inductor: bake weights into the package (CPU default: on, weights prepacked for oneDNN); "
                           "--no-freezing keeps them swappable with swap_weights")
    comp.add_argument("--quiet", action="store_true",
                      help="no status line (stage, C++ kernels done/total, elapsed); it is drawn only on a terminal")
    comp.set_defaults(fn=cmd_compile)

    run = sub.add_parser("run", help="load an artifact and run it on random or given inputs")
    run.add_argument("artifact", help="a .pt2 from `compile` (or a bucket folder)")
    run.add_argument("--inputs", help="a .safetensors of input tensors named like the artifact's inputs")
    run.add_argument("--output", help="write the outputs to this .safetensors")
    run.add_argument("--repeats", type=int, default=3)
    run.set_defaults(fn=cmd_run)

    insp = sub.add_parser("inspect", help="op histogram per UNet block, pass report, parameter bytes, SVG picture")
    src = insp.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny (default), sd15, sd21, sdxl")
    src.add_argument("--checkpoint", help="a diffusers-layout unet folder")
    src.add_argument("--program", help="a torch.export.save'd ExportedProgram (.pt2)")
    src.add_argument("--artifact", help="a compiled .pt2 package (compiled_unet.save / aot=True): what it records "
                                        "(inputs, options, weights, the pass report of its compile)")
    insp.add_argument("--batch", type=int, default=1)
    insp.add_argument("--size", type=int, default=None, help="latent height = width")
    insp.add_argument("--passes", action=argparse.BooleanOptionalAction, default=True,
                      help="run passes.optimize and show what each pass changed (default: on)")
    insp.add_argument("--freeu", help="enable FreeU before export: s1,s2,b1,b2 (e.g. 0.9,0.2,1.2,1.4)")
    insp.add_argument("--format", choices=("text", "json"), default="text")
    insp.add_argument("--svg", help="write a block-level picture (SVG) here")
    insp.add_argument("--html", help="write one self-contained HTML report here (tables, block picture, charts)")
    insp.add_argument("--explorer", action="store_true",
                      help="serve the exported and optimized graphs side by side in Model Explorer on 127.0.0.1")
    insp.add_argument("--explorer-out", metavar="DIR",
                      help="write the Model Explorer graphs and overlay JSON files here (no server)")
    insp.add_argument("--port", type=int, default=8765, help="Model Explorer port for --explorer (default 8765)")
    insp.add_argument("--profile", action="store_true",
                      help="time every node of both graphs (eager CPU/CUDA run, node by node) for the overlays")
    insp.add_argument("--profile-repeats", type=int, default=3, help="runs per graph for --profile (median)")
    insp.set_defaults(fn=cmd_inspect)
    serve = sub.add_parser("serve", help="serve an artifact on Ray Serve replicas (HTTP + Ray handles), batched")
    serve.add_argument("artifact", help="a .pt2 or a bucket folder from `compile`")
    serve.add_argument("--replicas", type=int, default=2)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address (default: loopback only)")
    serve.add_argument("--address", default=None, help="join this Ray cluster (replicas on its machines) instead of "
                       "starting Ray here")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use when started here")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a replica waits to fill a batch")
    serve.add_argument("--threads", type=int, default=1, help="torch threads per replica (default 1: 2 replicas "
                       "on 2 cores)")
    serve.set_defaults(fn=cmd_serve)
    sub.add_parser("bench", add_help=False, help="side-by-side benchmark vs diffusers (+ torch.compile); "
                   "see `compiled-unet bench --help`")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (UserError, ValueError, TypeError, OSError) as e:
        # User errors (bad arguments, damaged files, unwritable paths, also after a long compile): one line.
        print(f"compiled-unet: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. a compile that failed: one line, and where to look
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"compiled-unet: error: {first} (set COMPILED_UNET_TRACEBACK=1 for the full trace)", file=sys.stderr)
        if os.environ.get("COMPILED_UNET_TRACEBACK"):
            raise
        return 1
    except KeyboardInterrupt:
        print("compiled-unet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
