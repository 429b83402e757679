"""Look at the built docs site in headless Chromium, as a reader opening it from disk does.

Every page of ``site/`` is opened from ``file://``; a problem is a request that fails (a missing script, style sheet
or image), an image that does not decode, a script error, or an internal link whose page or anchor does not exist.
Screenshots of the pages named with ``--shots`` go to ``--shots-dir``. One line per problem; exit status 1 if any.

Usage: ``python tools/check_site.py [site] [--shots index.html ...] [--shots-dir DIR]``. Chromium comes from
``$CHROMIUM`` or the ``chromium`` on ``PATH`` (Debian's package: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

_PAGE_SCRIPT = """() => ({
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    images: [...document.images].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src),
})"""


def chromium() -> str:
    """The Chromium binary to drive."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("check_site: no Chromium found; install it (apt-get install chromium) or set $CHROMIUM")
    return found


def check(site: Path, shots: list[str] = (), shots_dir: Path | None = None) -> tuple[list[str], int]:
    """Problems found in ``site`` (one line each) and the number of pages opened."""
    from playwright.sync_api import sync_playwright

    site = site.resolve()
    pages = sorted(p for p in site.rglob("*.html")  # 404.html is for a web server: its links are absolute
                   if "assets" not in p.relative_to(site).parts and p.name != "404.html")  # fmt: skip
    problems: list[str] = []
    ids: dict[Path, set[str]] = {}
    links: list[tuple[Path, str]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        current: list[Path] = []
        page.on("requestfailed", lambda r: r.failure == "net::ERR_ABORTED" or problems.append(  # aborted: navigated on
            f"{current[0].relative_to(site)}: {r.url} failed to load ({r.failure})"))  # fmt: skip
        page.on("pageerror", lambda e: problems.append(f"{current[0].relative_to(site)}: script error: {e}"))
        for path in pages:
            current[:] = [path]
            page.goto(path.as_uri(), wait_until="load")
            found = page.evaluate(_PAGE_SCRIPT)
            ids[path] = set(found["ids"])
            links += [(path, href) for href in found["links"]]
            problems += [f"{path.relative_to(site)}: image {src} does not decode" for src in found["images"]]
            name = str(path.relative_to(site))
            if shots_dir is not None and name in shots:
                shots_dir.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=shots_dir / (name.replace("/", "_").removesuffix(".html") + ".png"))
        browser.close()
    for source, href in links:
        url, fragment = urldefrag(href)
        parsed = urlparse(url)
        if parsed.scheme != "file":
            continue
        target = Path(unquote(parsed.path))
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"{source.relative_to(site)}: link to {href} (no such file)")
        elif fragment and target in ids and unquote(fragment) not in ids[target]:
            problems.append(f"{source.relative_to(site)}: link to {href} (no anchor #{fragment})")
    return problems, len(pages)


def main(argv: list[str] | None = None) -> int:
    """Check the site; print the problems and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="site", type=Path)
    parser.add_argument("--shots", nargs="*", default=[], help="pages to screenshot (paths inside the site)")
    parser.add_argument("--shots-dir", type=Path, default=Path("site-screenshots"))
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"check_site: {args.site} holds no index.html; build it first (make docs)", file=sys.stderr)
        return 2
    problems, n = check(args.site, args.shots, args.shots_dir)
    for line in problems:
        print(line)
    print(f"check_site: {n} pages opened in headless Chromium, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
