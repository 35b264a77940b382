"""Headless Chromium for tests that look at a page: the system browser and driver, nothing downloaded.

    from browser import chromium  # noqa: F401  (a pytest fixture: a selenium WebDriver)

Debian's packages: `apt-get install chromium chromium-driver` and `pip install selenium`.
Without them the tests that use the fixture are skipped with the reason.
"""
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1200,900")


def chromium_binary():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium(tmp_path):
    """A selenium WebDriver on headless Chromium with a fresh profile; quit after the test."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    binary = chromium_binary()
    if binary is None or not shutil.which(CHROMEDRIVER):
        pytest.skip(f"needs chromium and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    # an explicit driver path: selenium-manager (which would download a browser) never runs
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_script(args, url, timeout=120, log=None):
    """Run `python ARGS...` and wait until `url` answers; returns the Popen (terminate it after)."""
    process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(args)} exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{' '.join(args)} did not answer {url} within {timeout} s")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
