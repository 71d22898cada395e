"""Make docs/explorer-sd15.png, the README's Model Explorer screenshot (headless Chromium, no network).

    python docs/make_screenshot.py [--from DIR]   # DIR: an existing --explorer-out folder (else SD1.5, 8x8)

The page: the SD1.5 preset's exported graph (left) and optimized graph (right), a block expanded in each,
the provenance overlay on the right (which pass created or rewired each node), op categories on the left.
The PNG is palette-quantized to stay small (< 200 KB).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Click the eye of a node-data provider in the left or right pane (the panes' side panels are DOM; the
# graph itself is a WebGL canvas).
_SHOW = """(() => {{
  const rows = [...document.querySelectorAll('*')].filter(e => e.children.length === 0 &&
      e.textContent.trim() === {name!r});
  for (const r of rows) {{
    const x = r.getBoundingClientRect().x;
    if (({right} && x < innerWidth / 2) || (!{right} && x > innerWidth / 2)) continue;
    let row = r.parentElement;
    for (let i = 0; i < 4 && row; i++, row = row.parentElement) {{
      const eye = [...row.querySelectorAll('*')].find(e => e.children.length === 0 &&
          e.textContent.trim().startsWith('visibility'));
      if (eye) {{ eye.click(); return eye.textContent.trim(); }}
    }}
  }}
  return null;
}})()"""


_FOLD = """(() => {
  const btns = [...document.querySelectorAll('*')].filter(e => e.children.length === 0 &&
      e.textContent.trim() === 'chevron_right' && e.getBoundingClientRect().y > innerHeight - 80);
  btns.forEach(e => e.click());
  setTimeout(() => [...document.querySelectorAll('*')].filter(e => e.children.length === 0 &&
      e.textContent.trim() === 'fit_screen').forEach(e => e.click()), 1000);  // re-fit to the wider panes
  return btns.length;
})()"""


def build(out_dir: str) -> None:
    from compiled_unet import export, views
    from compiled_unet.presets import build_random, example_inputs

    model = build_random("sd15")
    sample, t, kwargs = example_inputs("sd15", batch=1, latent_size=8)
    views.write_explorer(views.build(export(model, sample, t, **kwargs), "sd15"), out_dir)


def main() -> int:
    from compiled_unet._atomic import write_atomic
    from compiled_unet.views.chromium import Browser

    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "explorer-sd15.png"))
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--expand", default="up_blocks.1", help="a group to expand in both panes (\"\": none)")
    ap.add_argument("--hide-panels", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args()
    src = args.src or tempfile.mkdtemp(prefix="cu-shot-")
    if not args.src:
        build(src)
    proc = subprocess.Popen([sys.executable, "-m", "compiled_unet.views.explorer", src, "--port", str(args.port),
                             "--no-open"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/check_health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        query = open(os.path.join(src, "url.txt")).read().strip()
        data = json.loads(urllib.parse.unquote(query[len("?data="):]))
        for pane in data["uiState"]["paneStates"]:
            pane["deepestExpandedGroupNodeIds"] = [f"{args.expand}___group___"] if args.expand else []
        query = "?data=" + urllib.parse.quote(json.dumps(data))
        with Browser(width=1400, height=820) as b:
            b.open(f"http://127.0.0.1:{args.port}/{query}", wait_for=["optimized", "provenance", "down_blocks.0"],
                   timeout=150, settle=3)
            print("left op category:", b.evaluate(_SHOW.format(name="op category", right="false")))
            print("right provenance:", b.evaluate(_SHOW.format(name="provenance", right="true")))
            time.sleep(2)
            if args.hide_panels:  # fold both side panels so the graphs get the width
                print("panels folded:", b.evaluate(_FOLD))
                time.sleep(3)
            png = b.screenshot(os.path.join(tempfile.gettempdir(), "cu-shot-full.png"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    write_atomic(args.out, buf.getvalue())
    print(f"{args.out}: {len(buf.getvalue()) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
