"""The dashboard in a real browser (Debian's chromium + chromium-driver through selenium),
against the API served by uvicorn. Jobs are driven through the service layer exactly as the
dispatcher drives them (claim, metrics, progress), so the page's live curve is fed by the same
event stream a real run feeds, while the test decides when each point arrives.

Set ``METASERVE_DASHBOARD_SCREENSHOTS=DIR`` to save a screenshot of each page, and
``METASERVE_DASHBOARD_REPORT=FILE`` to write the measured figures as JSON (docs/DASHBOARD.md).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from selenium import webdriver  # a dev dependency: missing, the suite fails (no skip)
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from metaserve.api.app import create_app
from metaserve.service import auth, claims, job_store, jobs
from metaserve.service.db import make_engine, session_factory
from metaserve.service.orm import Base, JobStatus
from metaserve.service.settings import Settings
from metaserve.workers.spec import JobSpec
from tests.server_process import free_port

pytestmark = pytest.mark.server  # uvicorn on a port, driven by chromium

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WORKER = "dispatcher-under-test"
POINTS = 10_000
STEPS = POINTS // 2  # two series (loss before and after adaptation): 10,000 points
FIRST_LOAD_BUDGET_BYTES = 300 * 1024



@pytest.fixture(scope="module")
def browser() -> Iterator["webdriver.Chrome"]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--disable-extensions"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The API on SQLite served by uvicorn, two users, and their jobs."""
    root = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{root / 'metaserve.db'}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    with sessions() as session:
        alice, alice_key = auth.create_key(session=session, name="alice")
        bob, bob_key = auth.create_key(session=session, name="bob")
    port = free_port()
    app = create_app(Settings(database_url=url, dispatcher=False, artifact_root=root / "artifacts"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "sessions": sessions, "alice": alice,
           "artifact_root": root / "artifacts",
           "alice_key": alice_key, "bob": bob, "bob_key": bob_key}
    server.should_exit = True
    thread.join(timeout=20)
    engine.dispose()


def submit(site: dict, name: str, **spec) -> str:
    with site["sessions"]() as session:
        job, _ = jobs.submit_job(session=session, owner=site["alice"], spec=JobSpec.model_validate(
            {"name": name, "algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
             "iterations": POINTS, **spec}))
        return job.id


def claim(site: dict, job_id: str) -> None:
    with site["sessions"].begin() as session:
        claimed = claims.claim_next_job(session=session, worker_id=WORKER, lease_s=600)
    assert claimed is not None and claimed.id == job_id


def report(site: dict, job_id: str, steps: range, *, total: int = POINTS) -> None:
    """What the dispatcher writes for a run at ``steps``: the two training losses and progress."""
    rows = [row for step in steps for row in (
        (step, "train/loss_before", 2.0 / (1 + step / 400)),
        (step, "train/loss_after", 1.0 / (1 + step / 250)))]
    with site["sessions"]() as session:
        with session.begin():
            job_store.add_metrics(session=session, job_id=job_id, rows=rows)
        with session.begin():
            job_store.update_progress(session=session, job_id=job_id, worker_id=WORKER, message="",
                                      progress={"iteration": steps[-1], "total": total,
                                                "tasks_per_s": 812.4, "eta_s": 30.0,
                                                "workers": 1})


def evaluate(site: dict, job_id: str, step: int) -> None:
    rows = [(step, f"val/loss_step{k}", 0.9 / (k + 1)) for k in (1, 10)]
    rows += [(step, f"val/loss_step{k}_ci95", 0.05) for k in (1, 10)]
    with site["sessions"].begin() as session:
        job_store.add_metrics(session=session, job_id=job_id, rows=rows)


def wait(browser, condition, timeout: float = 20.0, message: str = ""):  # noqa: ANN001, ANN201
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        state = browser.execute_script(
            "const d = window.metaserveDashboard; return {points: d.points, renders: d.renders,"
            " live: (document.getElementById('live') || {}).textContent};")
        pytest.fail(f"timed out: {message}; the page: {state}")


def shot(browser, name: str) -> None:  # noqa: ANN001
    directory = os.environ.get("METASERVE_DASHBOARD_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(directory) / f"{name}.png"))


def log_in(browser, site: dict, key: str) -> None:  # noqa: ANN001
    browser.get(site["url"] + "/")
    if not browser.find_elements(By.ID, "key"):
        browser.execute_script("sessionStorage.clear();")
        browser.get(site["url"] + "/")
    wait(browser, lambda b: b.find_elements(By.ID, "key"), message="login form")
    field = browser.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()


def chart_points(browser, group: str) -> int:  # noqa: ANN001
    return browser.execute_script(
        "const c = window.metaserveDashboard.charts; return c ? c.points(arguments[0]) : 0;", group)


def listed_ids(browser) -> list[str]:  # noqa: ANN001
    """The ids of the listed jobs, read in one script (the list may be re-rendered between
    two element lookups)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#jobs tbody tr[data-id]')].map((r) => r.dataset.id);")


def listed_names(browser) -> list[str]:  # noqa: ANN001
    return browser.execute_script(
        "return [...document.querySelectorAll('#jobs tbody tr[data-id]')].map((r) => r.dataset.name);")


FIGURES: dict[str, float] = {}


def test_a_user_logs_in_sees_live_curves_compares_and_cancels_and_another_user_sees_nothing(
        browser, site: dict) -> None:  # noqa: ANN001
    running = submit(site, "sine-live")
    finished = submit(site, "sine-reptile", algorithm={"name": "reptile"})
    queued = submit(site, "sine-queued")
    claim(site, running)
    report(site, running, range(10, 101, 10))
    evaluate(site, running, 100)

    # The first load (the login page, nothing cached), then a refused key, then alice's: the
    # list shows her jobs; the key is in sessionStorage only.
    browser.get(site["url"] + "/")
    wait(browser, lambda b: b.find_elements(By.ID, "key"), message="login form")
    FIGURES["first_load_bytes"] = browser.execute_script(
        "return performance.getEntriesByType('navigation').concat("
        "performance.getEntriesByType('resource')).reduce((s, e) => s + e.transferSize, 0);")
    assert 0 < FIGURES["first_load_bytes"] < FIRST_LOAD_BUDGET_BYTES
    shot(browser, "login")
    log_in(browser, site, "ms_not-a-key")
    wait(browser, lambda b: "refused" in b.find_element(By.ID, "login-error").text, message="refusal")
    log_in(browser, site, site["alice_key"])
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-id]")) == 3,
         message="alice's three jobs listed")
    assert site["alice_key"] not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('metaserve.apiKey')") == site["alice_key"]
    assert listed_names(browser) == ["sine-queued", "sine-reptile", "sine-live"]
    assert browser.find_element(By.ID, "page-info").text == "1–3 of 3"
    shot(browser, "jobs")

    # The running job: its curve gains points from the event stream, without a reload.
    browser.find_element(By.LINK_TEXT, "sine-live").click()
    wait(browser, lambda b: chart_points(b, "train_loss") == 20, message="the first 20 points")
    browser.execute_script("window.__sameDocument = true;")
    report(site, running, range(110, 301, 10))
    evaluate(site, running, 300)
    wait(browser, lambda b: chart_points(b, "train_loss") == 60, message="40 more points, live")
    assert browser.execute_script("return window.__sameDocument === true")
    wait(browser, lambda b: chart_points(b, "eval_loss") == 4, message="the evaluation, live")
    assert "300 / 10000" in browser.find_element(By.CSS_SELECTOR, ".kv").text
    history = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#history li")]
    assert [item.split(" · ")[0] for item in history] == ["queued attempt 0", "running attempt 1"]
    shot(browser, "job")

    # Compare the running and the finished job.
    claim(site, finished)
    report(site, finished, range(10, 201, 10), total=200)
    with site["sessions"].begin() as session:
        job_store.finish_job(session=session, job_id=finished, worker_id=WORKER,
                             status=JobStatus.SUCCEEDED)
    # The finished job's artifact downloads with the key in a header (the page hands the
    # bytes to the browser as a blob).
    from metaserve.service import artifacts

    directory = artifacts.job_dir(site["artifact_root"], finished)
    directory.mkdir(parents=True)
    (directory / "meta_init.json").write_text('{"kind": "meta_init"}')
    described = artifacts.describe(directory / "meta_init.json")
    with site["sessions"].begin() as session:
        job_store.add_artifact(session=session, job_id=finished, name="meta_init.json",
                               size=described.size, sha256=described.sha256,
                               media_type=described.media_type)
    browser.get(site["url"] + f"/#/jobs/{finished}")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#artifacts button"),
         message="the artifact listed")
    browser.execute_script("URL.createObjectURL = (blob) => { window.__download = blob; return 'data:text/plain,'; };")
    browser.find_element(By.CSS_SELECTOR, "#artifacts button").click()
    downloaded = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const wait = () => window.__download ? window.__download.text().then(done) : setTimeout(wait, 50);
        wait();""")
    assert json.loads(downloaded) == {"kind": "meta_init"}

    browser.get(site["url"] + "/#/")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"input[data-id='{running}']"))
    browser.find_element(By.CSS_SELECTOR, f"input[data-id='{running}']").click()
    browser.find_element(By.CSS_SELECTOR, f"input[data-id='{finished}']").click()
    browser.find_element(By.ID, "compare-selected").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#compare-charts canvas"),
         message="the compare charts")
    # Every metric on a chart of its own with both jobs: 30 + 20 steps of each training loss.
    assert [row.get_attribute("data-metric") for row in browser.find_elements(
        By.CSS_SELECTOR, "#compare-table tbody tr")][:2] == ["train/loss_after", "train/loss_before"]
    assert browser.execute_script("return window.metaserveDashboard.points") == 2 * (30 + 20) + 4
    assert {node.get_attribute("data-metric") for node in browser.find_elements(
        By.CSS_SELECTOR, "#compare-charts > [data-metric]")} == {
        "train/loss_after", "train/loss_before", "val/loss_step1", "val/loss_step10"}

    # Resubmit the queued job's spec from its page (a new job, its page opens), then cancel
    # the queued job from its page.
    browser.get(site["url"] + f"/#/jobs/{queued}")
    wait(browser, lambda b: b.find_element(By.ID, "cancel").is_enabled(), message="cancel button")
    browser.find_element(By.ID, "resubmit").click()
    wait(browser, lambda b: b.current_url.split("/#/jobs/")[-1] not in (queued, ""),
         message="the resubmitted job's page")
    resubmitted = browser.current_url.split("/#/jobs/")[-1]
    wait(browser, lambda b: b.find_element(By.ID, "job-name").text == "sine-queued")
    with site["sessions"]() as session:
        with session.begin():
            assert job_store.get_job_row(session=session, job_id=resubmitted, owner=site["alice"]).spec == \
                job_store.get_job_row(session=session, job_id=queued, owner=site["alice"]).spec
        with session.begin():
            job_store.request_cancel(session=session, job_id=resubmitted, owner=site["alice"])
    browser.get(site["url"] + f"/#/jobs/{queued}")
    wait(browser, lambda b: b.execute_script(
        "const id = document.querySelector('.kv code'), cancel = document.getElementById('cancel');"
        "return !!id && id.textContent === arguments[0] && !cancel.disabled;", queued),
         message="the queued job's page and its cancel button")
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda b: b.find_element(By.ID, "job-status").text == "cancelled",
         message="cancelled on the page")
    with site["sessions"]() as session:
        assert job_store.job_status(session=session, job_id=queued) == JobStatus.CANCELLED

    # Bob: none of alice's jobs in his list, her job's page and its API calls say 404.
    browser.find_element(By.ID, "logout").click()
    log_in(browser, site, site["bob_key"])
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#jobs tbody td.muted"), message="bob's list")
    assert browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-id]") == []
    browser.get(site["url"] + f"/#/jobs/{running}")
    wait(browser, lambda b: b.find_elements(By.ID, "job-error"), message="bob's job page")
    assert browser.find_element(By.ID, "job-error").text == "No such job of yours."
    statuses = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const headers = {Authorization: 'Bearer ' + sessionStorage.getItem('metaserve.apiKey')};
        Promise.all(['', '/metrics', '/events', '/logs', '/artifacts'].map(
            (tail) => fetch('/v1/jobs/' + arguments[0] + tail, {headers}).then((r) => r.status)))
          .then(done);""", running)
    assert statuses == [404, 404, 404, 404, 404]


def test_the_job_page_shows_ten_thousand_points_and_stays_responsive(browser, site: dict) -> None:  # noqa: ANN001
    big = submit(site, "sine-10k")
    claim(site, big)
    for start in range(1, STEPS + 1, 2500):
        report(site, big, range(start, start + 2500))
    log_in(browser, site, site["alice_key"])
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-id]"))
    browser.execute_script("location.hash = arguments[0];", f"#/jobs/{big}")
    started = browser.execute_script("return performance.now();")
    wait(browser, lambda b: chart_points(b, "train_loss") == POINTS, timeout=60,
         message="10,000 points (5,000 steps of 2 series)")
    figures = browser.execute_script("return window.metaserveDashboard;")
    FIGURES["points"] = POINTS
    FIGURES["time_to_all_points_ms"] = round(figures["lastRenderAt"] - started, 1)
    FIGURES["last_render_ms"] = round(figures["lastRenderMs"], 1)
    FIGURES["max_render_ms"] = round(figures["maxRenderMs"], 1)
    # Responsive: a click is handled at once (the page is not stuck in a long task).
    clicked = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const t0 = performance.now();
        document.getElementById('history').addEventListener('click', () => done(performance.now() - t0), {once: true});
        document.getElementById('history').click();""")
    FIGURES["click_handled_ms"] = round(clicked, 1)
    FIGURES["longest_task_ms"] = round(browser.execute_script(
        "return window.metaserveDashboard.longestTaskMs;"), 1)
    assert FIGURES["max_render_ms"] < 2000 and FIGURES["click_handled_ms"] < 500
    shot(browser, "job-10k")
    target = os.environ.get("METASERVE_DASHBOARD_REPORT")
    if target:
        Path(target).write_text(json.dumps({**FIGURES, "chromium": browser.capabilities.get(
            "browserVersion")}, indent=2) + "\n")


def test_a_sweep_page_ranks_its_trials_and_plots_the_metric_against_a_parameter(
        browser, site: dict) -> None:  # noqa: ANN001
    import httpx

    from metaserve.service import job_store
    from metaserve.service.ids import new_id
    from metaserve.service.orm import Job, utcnow

    space = {"algorithm.inner_lr": {"grid": [0.003, 0.03, 0.3]}}
    response = httpx.post(site["url"] + "/v1/sweeps", headers={
        "Authorization": f"Bearer {site['alice_key']}"}, json={
        "name": "sweep-inner-lr", "spec": {"algorithm": {"name": "maml"},
                                           "task_family": {"name": "sine"}, "iterations": 100},
        "space": space, "search": {"name": "grid"},
        "scheduler": {"name": "fifo", "metric": "val/loss_step1", "mode": "min"}}, timeout=60)
    assert response.status_code == 201, response.text
    sweep_id = response.json()["id"]
    trials = {}
    # Three running trials as the dispatcher records them (service/child_jobs.py), written here
    # as rows: the sweep's driver stays queued, so the page shows a sweep that has not started.
    with site["sessions"]() as session:
        now = utcnow()
        for index, (inner_lr, loss) in enumerate(((0.003, 0.9), (0.03, 0.2), (0.3, 0.5))):
            job_id = trials[inner_lr] = new_id()
            spec = {"algorithm": {"name": "maml", "inner_lr": inner_lr},
                    "task_family": {"name": "sine"}, "iterations": 100}
            session.add(Job(id=job_id, owner_id=site["alice"].id, name=f"sweep-inner-lr-t{index}",
                            spec=spec, spec_hash=job_store.spec_hash(spec), status="running",
                            attempt=1, max_attempts=1, progress={}, created_at=now,
                            updated_at=now, started_at=now, sweep_id=sweep_id,
                            trial_id=f"t{index}", message=f"trial t{index} started"))
            session.flush()
            job_store.add_metrics(session=session, job_id=job_id,
                                  rows=[(100, "val/loss_step1", loss)])
        session.commit()
    log_in(browser, site, site["alice_key"])
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#jobs tbody tr"))
    browser.find_element(By.ID, "nav-sweeps").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"#sweeps tr[data-id='{sweep_id}']"),
         message="the sweep listed")
    browser.find_element(By.LINK_TEXT, "sweep-inner-lr").click()
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 3,
         message="the leaderboard")
    ranked = [row.get_attribute("data-id")
              for row in browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")]
    assert ranked == [trials[0.03], trials[0.3], trials[0.003]]  # val/loss_step1, min first
    assert browser.execute_script("return window.metaserveDashboard.points") == 3
    # Parallel coordinates: the swept path and the metric, a line per trial with a value.
    assert len(browser.find_elements(By.CSS_SELECTOR, "#parallel polyline")) == 3
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#parallel .axis-title")] == [
        "algorithm.inner_lr (log)", "val/loss_step1"]
    wait(browser, lambda b: b.find_elements(By.ID, "importance-note"), message="importance")
    assert browser.find_element(By.ID, "importance-note").text == (
        "0 finished trial(s) with a value of val/loss_step1; an estimate needs 4")
    assert browser.find_element(By.ID, "main").text.startswith("sweep-inner-lr\nqueued\nTrials")
    shot(browser, "sweep")
    browser.find_element(By.LINK_TEXT, "Trials as jobs").click()
    wait(browser, lambda b: b.find_elements(By.ID, "sweep-filter"), message="the sweep filter")
    wait(browser, lambda b: {row.get_attribute("data-id") for row in b.find_elements(
        By.CSS_SELECTOR, "#jobs tbody tr[data-id]")} == set(trials.values()),
         message="the trials as jobs")
    log_in(browser, site, site["bob_key"])
    browser.get(site["url"] + f"/#/sweeps/{sweep_id}")
    wait(browser, lambda b: b.find_elements(By.ID, "sweep-error"), message="bob's sweep page")
    assert browser.find_element(By.ID, "sweep-error").text == "No such sweep of yours."




def test_the_name_search_runs_on_the_server_and_finds_jobs_beyond_the_first_page(
        browser, site: dict) -> None:  # noqa: ANN001
    """The needle is alice's oldest job, more than a page (25) behind the newest: a search of
    the loaded page could not find it. Bob's job of the same name stays his."""
    needle = submit(site, "Needle-in-the-haystack")
    for index in range(30):
        submit(site, f"hay-{index}")
    with site["sessions"]() as session:
        jobs.submit_job(session=session, owner=site["bob"], spec=JobSpec.model_validate(
            {"name": "needle-of-bob", "algorithm": {"name": "maml"}, "task_family": {"name": "sine"}}))
    log_in(browser, site, site["alice_key"])
    wait(browser, lambda b: len(listed_ids(b)) == 25, message="the first page")
    assert needle not in listed_ids(browser)
    browser.find_element(By.ID, "search").send_keys("nEEDLE")  # typing: listed after a pause
    wait(browser, lambda b: listed_ids(b) == [needle], message="the needle found")
    assert "q=nEEDLE" in browser.current_url
    assert browser.switch_to.active_element.get_attribute("id") == "search"  # still typing
    assert browser.find_element(By.ID, "search").get_attribute("value") == "nEEDLE"
    shot(browser, "jobs-search")
    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys("no such job\n")  # Enter: at once
    wait(browser, lambda b: b.find_elements(By.ID, "no-jobs"), message="no match")
    assert browser.find_element(By.ID, "no-jobs").text == "No jobs whose name contains “no such job”."


def finished_run(site: dict, name: str, inner_lr: float, final_loss: float,
                 meta_batch_size: int = 4) -> str:
    """A succeeded job as the dispatcher leaves one: training losses and throughput every 10
    steps stored 5 s apart (the wall-clock axis and the rate read those times), a final
    validation loss, and a meta-init artifact (what a model version needs)."""
    from datetime import timedelta

    from sqlalchemy import update

    from metaserve.service import artifacts
    from metaserve.service.orm import Job, Metric, utcnow

    job_id = submit(site, name, iterations=50, meta_batch_size=meta_batch_size,
                    algorithm={"name": "maml", "inner_lr": inner_lr})
    start = utcnow() - timedelta(minutes=5)
    with site["sessions"].begin() as session:
        rows = [row for step in range(10, 51, 10) for row in (
            (step, "train/loss_after", final_loss * (2 - step / 50)),
            (step, "train/tasks_per_second", 99999.0))]  # the reported rate: not what is drawn
        rows.append((50, "val/loss_step1", final_loss))
        job_store.add_metrics(session=session, job_id=job_id, rows=rows)
        for step in range(10, 51, 10):
            session.execute(update(Metric).where(Metric.job_id == job_id, Metric.step == step)
                            .values(created_at=start + timedelta(seconds=step / 2)))
        session.execute(update(Job).where(Job.id == job_id).values(
            status="succeeded", attempt=1, started_at=start, finished_at=start + timedelta(seconds=30),
            progress={"iteration": 50, "total": 50}))
    directory = artifacts.job_dir(site["artifact_root"], job_id)
    directory.mkdir(parents=True)
    for file in ("meta_init.json", "meta_init.safetensors"):
        (directory / file).write_text("{}")
        described = artifacts.describe(directory / file)
        with site["sessions"].begin() as session:
            job_store.add_artifact(session=session, job_id=job_id, name=file, size=described.size,
                                   sha256=described.sha256, media_type=described.media_type)
    return job_id


def column_texts(browser, key: str) -> list[str]:  # noqa: ANN001
    return browser.execute_script(
        "return [...document.querySelectorAll(`#jobs tbody td[data-column='${arguments[0]}']`)]"
        ".map((c) => c.textContent);", key)


def test_a_user_sorts_by_a_metric_adds_a_parameter_column_compares_three_runs_keeps_a_model_and_sees_new_jobs_live(
        browser, site: dict) -> None:  # noqa: ANN001
    from selenium.webdriver.support.ui import Select

    slow = finished_run(site, "cmp-slow", 0.01, 0.3)
    best = finished_run(site, "cmp-best", 0.1, 0.1, meta_batch_size=8)
    mid = finished_run(site, "cmp-mid", 0.5, 0.2)
    log_in(browser, site, site["alice_key"])
    wait(browser, lambda b: listed_ids(b), message="the list")
    browser.execute_script("localStorage.clear(); location.hash = '#/?q=cmp-';")
    wait(browser, lambda b: listed_names(b) == ["cmp-mid", "cmp-best", "cmp-slow"],
         message="the three runs, newest first")

    # Add the metric as a column and sort by it on the server (ascending on the second click).
    Select(browser.find_element(By.ID, "add-column")).select_by_value("metric:val/loss_step1")
    wait(browser, lambda b: column_texts(b, "metric:val/loss_step1") == ["0.2", "0.1", "0.3"],
         message="the metric column")
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='metric:val/loss_step1'] button.sort").click()
    wait(browser, lambda b: "order=desc" in b.current_url and listed_names(b) == [
        "cmp-slow", "cmp-mid", "cmp-best"], message="sorted by the metric, descending")
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='metric:val/loss_step1'] button.sort").click()
    wait(browser, lambda b: "order=asc" in b.current_url and listed_names(b) == [
        "cmp-best", "cmp-mid", "cmp-slow"], message="sorted by the metric, ascending")
    assert "sort=metric%3Aval%2Floss_step1" in browser.current_url

    # A parameter column, remembered by the browser across a reload.
    Select(browser.find_element(By.ID, "add-column")).select_by_value("param:algorithm.inner_lr")
    wait(browser, lambda b: column_texts(b, "param:algorithm.inner_lr") == ["0.1", "0.5", "0.01"],
         message="the parameter column")
    browser.refresh()
    wait(browser, lambda b: column_texts(b, "param:algorithm.inner_lr") == ["0.1", "0.5", "0.01"],
         message="the columns kept across a reload")
    shot(browser, "jobs-columns")

    # Compare the three: the diff table lists what differs; every metric has its chart.
    for job_id in (slow, best, mid):
        browser.find_element(By.CSS_SELECTOR, f"input[data-id='{job_id}']").click()
    browser.find_element(By.ID, "compare-selected").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#diff-table tbody tr"),
         message="the diff table")
    diff = browser.execute_script(
        "return [...document.querySelectorAll('#diff-table tbody tr')].map((r) =>"
        " [r.dataset.path, ...[...r.querySelectorAll('td')].map((c) => c.textContent)]);")
    assert diff == [["algorithm.inner_lr", "0.01", "0.1", "0.5"],  # in the order selected
                    ["meta_batch_size", "4", "8", "4"],
                    ["name", "cmp-slow", "cmp-best", "cmp-mid"]], diff
    browser.find_element(By.ID, "diff-all").click()
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#diff-table tbody tr")) > 10,
         message="every field")
    assert "3 of" in browser.find_element(By.ID, "diff-count").text
    charts = {node.get_attribute("data-metric") for node in browser.find_elements(
        By.CSS_SELECTOR, "#compare-charts > [data-metric]")}
    assert charts == {"train/loss_after", "val/loss_step1",
                      "throughput: tasks / s (wall clock)"}, charts
    # The throughput is the work per second of wall clock: 10 steps x the meta-batch per 5 s.
    rates = browser.execute_script(
        "const c = window.metaserveDashboard.compareCharts.get('throughput: tasks / s (wall clock)');"
        "return [...c.series.keys()].sort().map((n) => [n.split(' ')[0], c.line(n).map((p) => p[1])]);")
    assert rates == [["cmp-best", [16.0] * 4], ["cmp-mid", [8.0] * 4], ["cmp-slow", [8.0] * 4]]
    # Smoothing, log scale and the wall-clock axis redraw every chart.
    browser.find_element(By.ID, "chart-log").click()
    Select(browser.find_element(By.ID, "chart-x")).select_by_value("time")
    browser.execute_script("const s = document.getElementById('chart-smoothing'); s.value = '0.6';"
                           "s.dispatchEvent(new Event('input'));")
    xs = browser.execute_script(
        "const c = window.metaserveDashboard.compareCharts.get('train/loss_after');"
        "return Array.from(c.plot.data[0].slice(0, 3)).concat([c.plot.scales.y.distr]);")
    assert xs == [5, 10, 15, 3]  # seconds since the start; a log y-scale
    assert len(browser.find_elements(By.CSS_SELECTOR, "#compare-charts canvas")) == 3
    browser.execute_script("document.getElementById('chart-controls').scrollIntoView();")
    shot(browser, "compare")
    browser.execute_script(
        "localStorage.removeItem('metaserve.chartOptions'); localStorage.removeItem('metaserve.columns');")

    # A sweep's parallel coordinates and parameter importance: six finished trials whose loss
    # follows inner_lr.
    import httpx

    from metaserve.service.ids import new_id
    from metaserve.service.orm import Job, utcnow

    response = httpx.post(site["url"] + "/v1/sweeps", headers={
        "Authorization": f"Bearer {site['alice_key']}"}, json={
        "name": "sweep-pc", "spec": {"algorithm": {"name": "maml"}, "task_family": {"name": "sine"},
                                     "iterations": 100},
        "space": {"algorithm.inner_lr": {"grid": [0.001, 0.01, 0.1]},
                  "meta_batch_size": {"grid": [4, 8]}},
        "search": {"name": "grid"},
        "scheduler": {"name": "fifo", "metric": "val/loss_step1", "mode": "min"}}, timeout=60)
    assert response.status_code == 201, response.text
    sweep_id = response.json()["id"]
    with site["sessions"]() as session:
        now = utcnow()
        for index, (inner_lr, batch) in enumerate((a, b) for a in (0.001, 0.01, 0.1) for b in (4, 8)):
            job_id = new_id()
            spec = {"algorithm": {"name": "maml", "inner_lr": inner_lr}, "meta_batch_size": batch,
                    "task_family": {"name": "sine"}, "iterations": 100}
            session.add(Job(id=job_id, owner_id=site["alice"].id, name=f"sweep-pc/t{index}", spec=spec,
                            spec_hash=job_store.spec_hash(spec), status="succeeded", attempt=1,
                            max_attempts=1, progress={}, created_at=now, updated_at=now,
                            started_at=now, finished_at=now, sweep_id=sweep_id, trial_id=f"pc{index}"))
            session.flush()
            job_store.add_metrics(session=session, job_id=job_id, rows=[
                (100, "val/loss_step1", 1.0 / (1 + 100 * inner_lr) + 0.001 * batch)])
        session.commit()
    browser.get(site["url"] + f"/#/sweeps/{sweep_id}")
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#parallel polyline")) == 6,
         message="a line per trial")
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#parallel .axis-title")] == [
        "algorithm.inner_lr (log)", "meta_batch_size", "val/loss_step1"]
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#importance tr"), message="importance")
    ranked = [row.get_attribute("data-path")
              for row in browser.find_elements(By.CSS_SELECTOR, "#importance tr")]
    assert ranked == ["algorithm.inner_lr", "meta_batch_size"]
    shot(browser, "sweep")
    # The list folds the trials under their sweep's driver; expanding shows them.
    browser.get(site["url"] + "/#/?q=sweep-pc")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"button.expand[data-sweep='{sweep_id}']"),
         message="the driver with its trials folded")
    assert listed_names(browser) == ["sweep-pc (sweep driver)"]  # its trials folded under it
    browser.find_element(By.CSS_SELECTOR, f"button.expand[data-sweep='{sweep_id}']").click()
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#jobs tbody tr.trial")) == 6,
         message="the trials under their sweep")

    # Keep a result: a model, two versions, the alias moved from the first to the second.
    browser.get(site["url"] + "/#/models")
    wait(browser, lambda b: b.find_elements(By.ID, "new-model-name"), message="the models page")
    browser.find_element(By.ID, "new-model-name").send_keys("sine")
    browser.find_element(By.ID, "create-model").click()
    wait(browser, lambda b: b.find_elements(By.ID, "model-name") and
         b.find_element(By.ID, "model-name").text == "sine", message="the model's page")
    for job_id in (best, mid):
        wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"#register-job option[value='{job_id}']"),
             message="the succeeded jobs offered: " + browser.find_element(By.ID, "register-job").text)
        Select(browser.find_element(By.ID, "register-job")).select_by_value(job_id)
        browser.find_element(By.ID, "register-version").click()
        wait(browser, lambda b, job_id=job_id: b.find_elements(
            By.CSS_SELECTOR, f"#versions tr[data-version] a[href='#/jobs/{job_id}']"),
             message="the version listed")
    for version in ("1", "2"):
        wait(browser, lambda b, version=version: b.find_elements(
            By.CSS_SELECTOR, f"#alias-version option[value='{version}']"), message="the versions offered")
        Select(browser.find_element(By.ID, "alias-version")).select_by_value(version)
        browser.find_element(By.ID, "set-alias").click()
        wait(browser, lambda b, version=version: [e.text for e in b.find_elements(
            By.CSS_SELECTOR, f"#versions tr[data-version='{version}'] .aliases .badge")] == ["production"],
             message=f"production on v{version}")
    assert browser.find_elements(By.CSS_SELECTOR, "#versions tr[data-version='1'] .aliases .badge") == []
    alias = httpx.get(site["url"] + "/v1/models/sine/aliases/production",
                      headers={"Authorization": f"Bearer {site['alice_key']}"}, timeout=60).json()
    assert (alias["version"], alias["job_id"]) == (2, mid)
    wait(browser, lambda b: "val/loss_step1 0.1" in b.find_element(
        By.CSS_SELECTOR, "#versions tr[data-version='1']").text, message="the source job's metrics")
    shot(browser, "model")
    browser.get(site["url"] + "/#/models")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#models tr[data-name='sine']"))
    assert "production → v2" in browser.find_element(By.CSS_SELECTOR, "#models tr[data-name='sine']").text

    # A job submitted elsewhere appears in the open list without a reload.
    browser.get(site["url"] + "/#/?q=cmp-")
    wait(browser, lambda b: len(listed_ids(b)) == 3 and b.find_element(By.ID, "jobs-live").text == "live",
         message="the list, live")
    browser.execute_script("window.__sameDocument = true;")
    fresh = submit(site, "cmp-new")
    wait(browser, lambda b: listed_ids(b)[:1] == [fresh], message="the new job listed live")
    assert browser.execute_script("return window.__sameDocument === true")
    assert browser.find_element(By.ID, "page-info").text == "1–4 of 4"


def test_the_datasets_page_lists_kind_size_splits_and_what_each_is_usable_for(
        browser, site: dict) -> None:  # noqa: ANN001
    import httpx

    from tests.synthetic_datasets import npz_bytes, shapes

    uploaded = httpx.post(site["url"] + "/v1/datasets", params={"name": "shapes"},
                          content=npz_bytes(*shapes()), timeout=120,
                          headers={"Authorization": f"Bearer {site['alice_key']}"})
    assert uploaded.status_code == 201, uploaded.text
    dataset = uploaded.json()
    log_in(browser, site, site["alice_key"])
    wait(browser, lambda b: b.find_elements(By.ID, "nav-datasets"))
    browser.find_element(By.ID, "nav-datasets").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"#datasets tr[data-id='{dataset['id']}']"),
         message="the dataset listed")
    row = browser.find_element(By.CSS_SELECTOR, f"#datasets tr[data-id='{dataset['id']}']").text
    assert "images (npz)" in row and "30 classes, 600 images" in row
    for usable in dataset["usable_for"]:
        assert usable in row
    shot(browser, "datasets")
