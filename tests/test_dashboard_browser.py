"""The Ray dashboard of a running job, opened in a real browser (headless Chromium from
Debian's packages, driven by Selenium) with the cluster's auth token: the pipeline's actors
are listed by role and index, and a screenshot is kept.

The browser is installed by scripts/install_browser.sh (run here, so `make test` and CI
install it); the test skips only where that script says it cannot install (no apt-get, or
no root/sudo).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.ray_cluster import REPO, live_job, wait_for_actors

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.long]

PIPELINE = {"student-sampler-0", "teacher-scorer-0", "learner-rank-0"}


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    out = subprocess.run(
        ["bash", str(REPO / "scripts/install_browser.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode == 3:
        pytest.skip(f"Chromium cannot be installed here: {out.stderr.strip()}")
    assert out.returncode == 0, f"scripts/install_browser.sh failed:\n{out.stdout}\n{out.stderr}"
    return shutil.which("chromium"), shutil.which("chromedriver")


def _driver(chromium: tuple[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1600,1000")
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_dashboard_lists_the_named_actors(request, chromium, cache_root, toy_pair, tmp_path):
    job = live_job(request.config, cache_root, need_running=True)
    cluster = job["cluster"]
    namespace = f"opdplus-{job['name']}"
    wait_for_actors(cluster, namespace, PIPELINE, timeout=600)

    browser = _driver(chromium)
    try:
        # Without the token the dashboard's API refuses: the page would show no actors.
        browser.get(f"{cluster.dashboard_url}/api/jobs/")
        assert "Unauthorized" in browser.page_source or "401" in browser.page_source
        # The dashboard reads its token from the `ray-authentication-token` cookie (what its
        # own login form sets through POST /api/authenticate).
        browser.execute_cdp_cmd(
            "Network.setCookie",
            {
                "name": "ray-authentication-token",
                "value": cluster.token,
                "url": cluster.dashboard_url,
                "path": "/",
            },
        )
        browser.get(f"{cluster.dashboard_url}/#/actors")
        deadline = time.time() + 90
        text = ""
        while time.time() < deadline:
            text = browser.find_element("tag name", "body").text
            if all(name in text for name in PIPELINE):
                break
            time.sleep(2)
        shot = tmp_path / "ray-dashboard-actors.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    missing = [name for name in PIPELINE if name not in text]
    assert not missing, f"not on the actors page: {missing}\n{text[:3000]}"
    assert shot.stat().st_size > 10_000
    keep = REPO / "bench" / "results" / "ray-dashboard-actors.png"
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep)
    print(f"\nscreenshot: {shot} (copied to {keep})")
