"""`compiled-unet` command line. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
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

    from . import export
    from .presets import build_random, example_inputs

    from .presets import preset

    preset(args.preset)  # validate before printing progress
    print(f"[1/4] building preset {args.preset!r} with random weights", flush=True)
    model = build_random(args.preset)
    n_params = sum(p.numel() for p in model.parameters())
    sample, timestep, kwargs = example_inputs(args.preset, batch=args.batch, latent_size=args.size)
    print(f"      {n_params / 1e6:.2f} M parameters; sample {tuple(sample.shape)}", flush=True)

    print("[2/4] exporting with torch.export (one static graph)", flush=True)
    t0 = time.perf_counter()
    ep = export(model, sample, timestep, **kwargs)
    export_s = time.perf_counter() - t0
    ops = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    print(f"      {sum(ops.values())} ops in {export_s:.1f} s; most common: "
          + ", ".join(f"{k.split('.')[1] if '.' in k else k} x{v}" for k, v in ops.most_common(5)), flush=True)

    print("[3/4] checking the exported graph against eager", flush=True)
    exported = ep.module()
    with torch.no_grad():
        ref = model(sample, timestep, **kwargs).sample
        out = exported(sample, timestep, **kwargs, return_dict=False)[0]
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item() / scale
    ok = err <= 1e-5
    print(f"      max-abs error / output scale = {err:.2e} (tolerance 1e-5): {'OK' if ok else 'MISMATCH'}", flush=True)

    print(f"[4/4] timing {args.repeats} forwards each (median)", flush=True)
    with torch.no_grad():
        eager_t = _timeit(lambda: model(sample, timestep, **kwargs), args.repeats)
        exp_t = _timeit(lambda: exported(sample, timestep, **kwargs, return_dict=False), args.repeats)
    print()
    print(f"{'preset':8s} {'eager ms':>10s} {'exported ms':>12s} {'rel err':>9s}")
    print(f"{args.preset:8s} {statistics.median(eager_t) * 1e3:10.1f} {statistics.median(exp_t) * 1e3:12.1f} {err:9.1e}")
    return 0 if ok else 1


def _model_from_args(args):
    """(model, (sample, timestep, kwargs)) from --checkpoint DIR or --preset NAME."""
    import torch

    from .presets import build_random, example_inputs, preset

    if getattr(args, "checkpoint", None):
        import os

        from .unet import UNet2DConditionModel
        if not os.path.isdir(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint!r}: no such folder (expected diffusers' unet layout)")
        model = UNet2DConditionModel.from_pretrained(args.checkpoint)
        c = model.config
        size = args.size or (c.sample_size if isinstance(c.sample_size, int) else 64)
        g = torch.Generator().manual_seed(0)
        dim = c.encoder_hid_dim or (c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0])
        sample = torch.randn(args.batch, c.in_channels, size, size, generator=g)
        kwargs = {"encoder_hidden_states": torch.randn(args.batch, 77, dim, generator=g)}
        return model, (sample, torch.full((args.batch,), 500.0), kwargs)
    preset(args.preset)
    return build_random(args.preset), example_inputs(args.preset, batch=args.batch, latent_size=args.size)


def cmd_inspect(args) -> int:
    import os

    import torch

    from . import export
    from .inspect_graph import block_svg, inspect_program

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
    if args.passes:
        import passes
        ep, pass_report = passes.optimize(ep)
    report = inspect_program(ep, pass_report)
    print(report.to_json() if args.format == "json" else report.text())
    if args.svg:
        from ._atomic import write_atomic

        write_atomic(args.svg, block_svg(report, title=f"{title}{' (optimized)' if args.passes else ''}"))
        if args.format != "json":
            print(f"\nblock picture written to {args.svg}")
    return 0


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
    demo = sub.add_parser("demo", help="preset UNet -> export -> check against eager -> report")
    demo.add_argument("--preset", default="tiny", help="tiny (default), sd15, sd21, sdxl")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--size", type=int, default=None, help="latent height = width (default: the preset's)")
    demo.add_argument("--repeats", type=int, default=3)
    demo.set_defaults(fn=cmd_demo)

    insp = sub.add_parser("inspect", help="op histogram per UNet block, pass report, parameter bytes, SVG picture")
    src = insp.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny (default), sd15, sd21, sdxl")
    src.add_argument("--checkpoint", help="a diffusers-layout unet folder")
    src.add_argument("--program", help="a torch.export.save'd ExportedProgram (.pt2)")
    insp.add_argument("--batch", type=int, default=1)
    insp.add_argument("--size", type=int, default=None, help="latent height = width")
    insp.add_argument("--passes", action=argparse.BooleanOptionalAction, default=True,
                      help="run passes.optimize and show what each pass changed (default: on)")
    insp.add_argument("--freeu", help="enable FreeU before export: s1,s2,b1,b2 (e.g. 0.9,0.2,1.2,1.4)")
    insp.add_argument("--format", choices=("text", "json"), default="text")
    insp.add_argument("--svg", help="write a block-level picture (SVG) here")
    insp.set_defaults(fn=cmd_inspect)
    sub.add_parser("bench", add_help=False, help="side-by-side benchmark vs diffusers (+ torch.compile); "
                   "see `compiled-unet bench --help`")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (UserError, ValueError) as e:
        print(f"compiled-unet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compiled-unet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
