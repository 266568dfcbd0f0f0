"""Screenshot of `tunelab ui` for the README (docs/ui.png): the dashboard over a runs folder,
with one run opened (its results, curves and confusion matrix), taken with headless Chromium.

    python scripts/ui_screenshot.py --runs runs --open sst2-lora --out docs/ui.png
    python scripts/ui_screenshot.py --runs runs --compare sst2-lora,sst2-full --out docs/ui_compare.png

Needs Debian's chromium (/usr/bin/chromium) and the playwright package: scripts/setup.sh
installs both. The server runs in this process on a free loopback port and stops at the end.
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def serve_in_thread(app) -> tuple[str, object]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            sys.exit("the dashboard did not start within 30 s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="runs folder to show (default: runs)")
    parser.add_argument("--recipes", help="recipes folder (default: configs/ when it exists)")
    parser.add_argument("--open", help="run ID to open (default: the newest finished run)")
    parser.add_argument("--compare", help="comma-separated run IDs to compare instead")
    parser.add_argument("--out", default="docs/ui.png", help="PNG to write (default: docs/ui.png)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1150)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not the "
                        "first --height pixels")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from tunelab.ui.app import UiSettings, create_app, run_rows

    settings = UiSettings(runs=args.runs, recipes=args.recipes)
    rows = run_rows(Path(args.runs).resolve())
    finished = [r["id"] for r in rows if r["status"] == "finished"]
    if not finished and not args.compare:
        sys.exit(f"no finished run under {args.runs}: train one first (tunelab train ... "
                 f"run_dir={args.runs}/NAME)")
    url, server = serve_in_thread(create_app(settings))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url)
            page.locator("#runs tbody tr").first.wait_for()
            if args.compare:
                for rid in args.compare.split(","):
                    page.check(f'#runs tbody tr[data-run="{rid}"] input[type=checkbox]')
                page.click("#compare")
                page.locator("#compare-view svg.chart").first.wait_for()
            else:
                rid = args.open or finished[0]
                page.click(f'#runs tbody tr[data-run="{rid}"]')
                page.locator(f'#run-detail[data-run="{rid}"] svg.chart').first.wait_for()
                page.wait_for_load_state("networkidle")  # the plots
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=args.full_page)
            browser.close()
    finally:
        server.should_exit = True
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
