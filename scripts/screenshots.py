"""Screenshots of the demo's three tabs (docs/demo/*.png), taken in headless Chromium.

    python scripts/screenshots.py [--model outputs/main/model] [--output-dir docs/demo]

The model is the main job's (`python -m crem_hf.demo.main`), so the pictures show a trained model on the held-out
digit scans. Needs the demo and dev extras and Debian's chromium (scripts/install-browser.sh).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

from playwright.sync_api import expect, sync_playwright

from crem_hf.demo.app import DEFAULT_MODEL, build_app, digits_gallery, launch, load_demo_model
from crem_hf.io import ArgumentParser, run_command

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload(page, elem_id: str, *paths: str) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(list(paths))
    for path in paths:
        page.locator(f'#{elem_id} td.filename[aria-label="{os.path.basename(path)}"]').wait_for(timeout=WAIT_MS)


def shoot(model_path: str, output_dir: str) -> list[str]:
    """Serve the app on the held-out digits, drive each tab once and save one PNG per tab; returns their paths."""
    if not os.path.exists(CHROMIUM):
        raise ValueError(f"No Chromium at {CHROMIUM}: run scripts/install-browser.sh (apt-get install chromium).")
    os.makedirs(output_dir, exist_ok=True)
    model, processor = load_demo_model(model_path)
    scans = {}
    for _, path, metadata in digits_gallery():
        scans.setdefault(metadata["label"], path)
    written = []
    with tempfile.TemporaryDirectory() as workdir:
        app = build_app(model, processor, workdir=workdir)
        _, url, _ = launch(app, "127.0.0.1", free_port(), block=False, quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
                page.goto(url)

                page.locator("#search-text textarea").fill("the digit seven")
                page.locator("#search-button").click()
                page.locator("#search-hits td").first.wait_for(timeout=WAIT_MS)
                page.locator("#search-ask").click()
                expect(page.locator("#search-status")).to_contain_text("stored compressed context", timeout=WAIT_MS)
                written.append(os.path.join(output_dir, "search.png"))
                page.screenshot(path=written[-1], full_page=True)

                page.get_by_role("tab", name="Ask").click()
                upload(page, "ask-image", scans["four"])
                page.locator("#ask-button").click()
                page.locator("#compressed-stats td").first.wait_for(timeout=WAIT_MS)
                page.locator("#ask-preview img").wait_for(timeout=WAIT_MS)
                written.append(os.path.join(output_dir, "ask.png"))
                page.screenshot(path=written[-1], full_page=True)

                page.get_by_role("tab", name="Embed").click()
                upload(page, "embed-images", scans["three"], scans["seven"], scans["eight"])
                page.locator("#embed-texts textarea").fill("the digit three\nthe digit seven\nthe digit eight")
                page.locator("#embed-button").click()
                page.locator("#embed-plot img").wait_for(timeout=WAIT_MS)
                written.append(os.path.join(output_dir, "embed.png"))
                page.screenshot(path=written[-1], full_page=True)
                browser.close()
        finally:
            app.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/screenshots.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--output-dir", default="docs/demo")
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: print("\n".join(shoot(args.model, args.output_dir))))


if __name__ == "__main__":
    sys.exit(main())
