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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compiled-unet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="preset UNet -> export -> check against eager -> report")
    demo.add_argument("--preset", default="tiny", help="tiny (default), sd15, sd21, sdxl")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--size", type=int, default=None, help="latent height = width (default: the preset's)")
    demo.add_argument("--repeats", type=int, default=3)
    demo.set_defaults(fn=cmd_demo)
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
