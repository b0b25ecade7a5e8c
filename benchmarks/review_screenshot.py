"""A screenshot of the review page in a real headless Chromium, for docs/review.md (docs/review.png).

    python -m jobs.recategorize --output outputs/recategorize --executor local   # a night first
    .venv/bin/python benchmarks/review_screenshot.py --output outputs/recategorize

Serves the committed run in --output on a free loopback port (decisions go to a throwaway
reviews folder, so the night's own table is untouched), opens the page in Debian's chromium
through its chromedriver (Selenium downloads nothing), waits for every thumbnail, shows the
first item with its suggestions and saves the page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser(width: int = 1400, height: int = 900):
    """Headless Chromium driven through the system chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def images_loaded(driver) -> bool:
    """Every <img> on the page has finished, loaded or failed (the failed ones are replaced)."""
    return driver.execute_script(
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0)")


def main() -> None:
    from pipeline.config import GROCERY_DATASET
    from pipeline.config.review import ReviewConfig
    from pipeline.review.server import start_in_thread

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/recategorize", help="a nightly output folder")
    parser.add_argument("--save", default=str(REPO / "docs" / "review.png"))
    parser.add_argument("--iconic-images", default=GROCERY_DATASET,
                        help="Grocery Store dataset folder (iconic images); '' for none")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as reviews:
        cfg = ReviewConfig(output=str(Path(args.output).resolve()), port=0, reviews=reviews,
                           iconic_images=args.iconic_images or None, reviewer="screenshot")
        running = start_in_thread(cfg)
        driver = browser()
        try:
            driver.get(running.url)
            deadline = time.monotonic() + 60
            while not (driver.execute_script("return document.body.dataset.ready === '1'")
                       and images_loaded(driver)):
                if time.monotonic() > deadline:
                    break  # a missing thumbnail shows as "no image": the page is still worth a look
                time.sleep(0.2)
            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.save)
        finally:
            driver.quit()
            running.stop()
    print(f"saved {args.save}")


if __name__ == "__main__":
    main()
