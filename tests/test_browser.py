"""What a person sees, in a real browser: the MLflow UI served by `lth ui` and the HTML report, rendered by
headless Chromium (Debian's `chromium`, driven by playwright; scripts/install-system-packages installs it)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Project

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: run scripts/install-system-packages")


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium.new_page(viewport={"width": 1600, "height": 1000})
        chromium.close()


@pytest.fixture
def project(xor_with_reinit: Callable[[], Project]) -> Project:
    """XOR, rounds 0-1, with the random-reinitialization control (shared per session)."""
    return xor_with_reinit()


@contextlib.contextmanager
def serve_ui(project: Project, port: int) -> Iterator[list[str]]:
    """`lth ui` on the project's store, once it answers /health; stopped (its whole process group) on exit.
    Yields a list that holds the command's output once it stopped."""
    ui = subprocess.Popen(
        [sys.executable, "-m", "lth.cli", "ui", "--port", str(port)],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert "OK" in r.read().decode()
                break
            except OSError:
                assert ui.poll() is None, "lth ui exited: " + ui.stdout.read()
                assert time.monotonic() < deadline, "lth ui did not answer within 120 s"
                time.sleep(0.5)
        yield output
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
        output.append(ui.stdout.read())


def test_mlflow_ui_shows_trajectories_with_their_rounds_nested(project: Project, browser, free_port: int) -> None:
    from lth.core.config import load
    from lth.tracking.store import experiment_url

    hp = load(project.root / "params.yaml")
    url = experiment_url(hp, project.tracking_uri)
    assert url is not None and "workflowType=machine_learning" in url  # opens on training runs, not GenAI
    with serve_ui(project, free_port) as output:
        page = browser
        page.goto(re.sub(r"//[^/]+/", f"//127.0.0.1:{free_port}/", url, count=1))
        page.wait_for_selector("text=ticket-trial0", timeout=90_000)
        assert page.locator("text=reinit-trial0").is_visible()
        assert page.locator("text=ticket-round01-trial0").count() == 0  # rounds are folded under their parent
        page.locator("[role=row]", has_text="ticket-trial0").locator("button").first.click()
        page.wait_for_selector("text=ticket-round01-trial0", timeout=30_000)
        assert page.locator("text=ticket-round00-trial0").is_visible()
        shown = page.inner_text("body")
        durations = re.findall(r"\b\d+(?:\.\d+)?(?:ms|s|min)\b", shown)
        assert len(durations) >= 4, durations  # two parents and the two rounds shown
        assert not [d for d in durations if d.endswith("ms")], durations  # runs span training: not milliseconds
    assert f"http://127.0.0.1:{free_port}" in output[0]  # `lth ui` says where to look
    assert not (project.root / "mlruns").exists()  # it serves the project's store, not a new ./mlruns


def test_report_shows_its_table_figures_and_provenance(project: Project, browser) -> None:
    from lth.core.config import load

    hp = load(project.root / "params.yaml")
    report = project.root / "results" / "report.html"
    page = browser
    page.goto(report.as_uri())
    text = page.inner_text("body")
    assert hp.hash[:8] in text
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project.root, capture_output=True, text=True)
    assert commit.stdout.strip() in text
    assert "random reinitialization" in text and "winning ticket" in text
    assert page.locator("table tr").count() >= 3  # a header and rounds 0 and 1
    images = page.locator("img")
    figures = sorted(Path(project.root / "results" / "figures").glob("*.png"))
    assert images.count() >= len(figures) > 0
    for i in range(images.count()):  # every figure loaded and has a size a person can read
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth") > 300
