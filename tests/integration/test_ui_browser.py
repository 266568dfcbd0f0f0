"""`tunelab ui` in a real browser (Debian's headless Chromium driven by Playwright): the runs
table, a run's details, and a training started from the form that the page follows until it
finishes. Not skipped when the browser is missing: scripts/setup.sh installs it."""
import os
import re

import pytest
import yaml

from serving import running
from tunelab.config import resolve_config
from tunelab.train.loop import train
from tunelab.ui.app import UiSettings, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: run scripts/setup.sh (it "
                    "installs the dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's "
                    "chromium with apt-get)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def dashboard(tiny_bert, toy_data, tmp_path):
    """A recipes folder with one tiny recipe, a runs folder with one finished run, and the
    server over both."""
    recipes, root = tmp_path / "recipes", tmp_path / "runs"
    recipes.mkdir()
    tree = {"model": {"name": tiny_bert, "max_length": 32},
            "data": {"train": toy_data["train"], "validation": toy_data["validation"],
                     "test": toy_data["test"]},
            "method": {"name": "full"},
            "train": {"lr": 2e-3, "batch_size": 4, "epochs": 1, "eval_every": 5, "log_every": 1,
                      "precision": "fp32", "threads": 1, "tracker": "none",
                      "warmup_ratio": 0.0}}
    (recipes / "tiny.yaml").write_text("# tiny BERT on the toy set\n" + yaml.safe_dump(tree))
    train(resolve_config(recipes / "tiny.yaml", [f"run_dir={root / 'first'}"]), quiet=True)
    with running(create_app(UiSettings(runs=str(root), recipes=str(recipes)))) as url:
        yield url


def test_page_shows_runs_and_follows_a_training_to_finished(browser, dashboard):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(dashboard)

    row = page.locator('#runs tbody tr[data-run="first"]')
    row.wait_for()
    assert row.locator(".status").inner_text() == "finished"
    row.click()
    detail = page.locator('#run-detail[data-run="first"]')
    detail.wait_for()
    assert "accuracy" in detail.locator("table").nth(1).inner_text()  # the results table
    assert detail.locator("svg.chart path").count() >= 2  # loss and validation curves
    plot = detail.locator('img[alt="confusion_validation.png"]')
    plot.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle())

    page.click("#new-training")
    page.locator('#fields [name="train.epochs"]').wait_for()
    page.select_option("#recipe", "tiny.yaml")
    page.wait_for_function("document.querySelector('#command').textContent.includes('tiny.yaml')")
    page.fill('#fields [name="train.lr"]', "-1")  # refused by the config checks, shown at once
    page.wait_for_function("document.querySelector('#form-error').textContent"
                           ".includes('train.lr must be positive')")
    assert page.locator("#start").is_disabled()
    assert "bad" in page.locator('.field[data-key="train.lr"]').get_attribute("class")
    page.fill('#fields [name="train.lr"]', "0.002")
    page.fill('#fields [name="train.epochs"]', "3")
    page.wait_for_function("document.querySelector('#command').textContent"
                           ".endsWith('train.epochs=3')")
    page.fill("#run-name", "from-browser")
    page.click("#start")

    page.locator("#job").wait_for(state="visible")
    assert page.locator("#job-run").inner_text() == "from-browser"
    page.wait_for_function("document.querySelector('#job-state').textContent === 'finished'",
                           timeout=120_000)
    assert re.search(r"step 15 / 15", page.locator("#job-step").inner_text())
    assert "run written to" in page.locator("#job-log").inner_text()
    # the table refreshes on its own; the finished run shows there with its test accuracy
    new_row = page.locator('#runs tbody tr[data-run="from-browser"]')
    expect(new_row.locator(".status")).to_have_text("finished", timeout=10_000)
    expect(new_row.locator("td.num").nth(1)).to_have_text(re.compile(r"^\d\.\d{4}$"))
    assert errors == []
