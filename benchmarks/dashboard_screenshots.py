"""Screenshots of the dashboard over real runs (docs/dashboard/*.png, shown in
docs/DASHBOARD.md): a real ``metaserve serve`` (embedded default: SQLite, local Ray,
dispatcher on) in a fresh directory runs two short sine jobs (MAML, Reptile), one that
fails in its inner loop and a six-trial sweep; the MAML job becomes version 1 of a registered
model with the alias ``production``, and a small image dataset is uploaded; headless chromium
(Debian's, through selenium) takes the pictures.

    python benchmarks/dashboard_screenshots.py [--out docs/dashboard]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.server_process import ServerProcess  # noqa: E402

SINE = {"task_family": {"name": "sine"}, "iterations": 600, "meta_batch_size": 10,
        "log_every": 10, "checkpoint_every": 200,
        "evaluation": {"every": 100, "tasks": 100, "inner_steps": [1, 5]}}


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))


def wait_status(client, job_id: str, statuses: set[str], timeout: float = 600) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(1)


def wait_progress(client, job_id: str, iteration: int, timeout: float = 600) -> dict:  # noqa: ANN001
    """The job once it reached ``iteration`` (or ended)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        done = (job.get("progress") or {}).get("iteration", 0)
        if done >= iteration or job["status"] != "running" or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard"))
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="metaserve-shots-") as name:
        directory = Path(name)
        rng = np.random.default_rng(0)
        dataset = directory / "tiny.npz"
        np.savez(dataset, images=rng.integers(0, 255, size=(120, 8, 8), dtype=np.uint8),
                 labels=np.repeat(np.arange(40), 3))
        server = ServerProcess(directory, METASERVE_RAY_NUM_CPUS="2").start()
        driver = browser()
        try:
            # A long timeout: the first submit warms the cost model, slow on a loaded machine.
            client = httpx.Client(base_url=server.url, timeout=300,
                                  headers={"Authorization": f"Bearer {server.admin_key}"})
            maml = client.post("/v1/jobs", json={"name": "sine-maml", "algorithm": {"name": "maml"},
                                                 **SINE}).json()["id"]
            reptile = client.post("/v1/jobs", json={"name": "sine-reptile",
                                                    "algorithm": {"name": "reptile"}, **SINE}).json()["id"]
            failing = client.post("/v1/jobs", json={
                "name": "images-too-few-shots", "algorithm": {"name": "maml"},
                "task_family": {"name": "images", "path": str(dataset), "image_size": 8,
                                "ways": 2, "support_shots": 1, "query_shots": 1},
                "model": {"name": "mlp", "hidden": [8]}, "iterations": 20,
                "evaluation": {"every": 0, "tasks": 4, "inner_steps": [1], "support_shots": 5}}).json()["id"]
            sweep = client.post("/v1/sweeps", json={
                "name": "sweep-sine-inner-lr",
                "spec": {"algorithm": {"name": "maml"}, **SINE, "iterations": 100,
                         "evaluation": {"every": 50, "tasks": 50, "inner_steps": [1]}},
                "space": {"algorithm.inner_lr": {"loguniform": [0.001, 1.0]},
                          "outer_optimizer.lr": {"loguniform": [0.0003, 0.01]}},
                "search": {"name": "random", "seed": 0}, "num_samples": 6,
                "scheduler": {"name": "fifo", "metric": "val/loss_step1", "mode": "min"}})
            assert sweep.status_code == 201, sweep.text
            sweep = sweep.json()
            uploaded = client.post("/v1/datasets", params={"name": "tiny-images"},
                                   content=dataset.read_bytes(), timeout=120)
            assert uploaded.status_code == 201, uploaded.text
            driver.get(server.url + "/")
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "key"))
            driver.find_element(By.ID, "key").send_keys(server.admin_key)
            driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
            # The MAML job's page while it runs: its curves grow from the event stream.
            wait_status(client, maml, {"running"})
            driver.get(server.url + f"/#/jobs/{maml}")
            # taken while it runs, a third of the way (a fixed wait outlived the whole job)
            running = wait_progress(client, maml, SINE["iterations"] // 3)
            time.sleep(1.0)  # the page draws what the stream brought
            driver.save_screenshot(str(out / "real-job-running.png"))
            if running["status"] != "running":
                print(f"warning: the job was {running['status']} at the running screenshot")
            for job_id in (maml, reptile, failing):
                wait_status(client, job_id, {"succeeded", "failed", "cancelled"})
            driver.get(server.url + f"/#/jobs/{maml}")
            time.sleep(4)
            driver.save_screenshot(str(out / "real-job.png"))
            wait_status(client, sweep["driver_job_id"], {"succeeded", "failed", "cancelled"},
                        timeout=1200)
            # The run table with a metric and a parameter column (as a user adds them).
            driver.execute_script("localStorage.setItem('metaserve.columns', JSON.stringify("
                                  "['metric:val/loss_step5', 'param:algorithm.inner_lr']));")
            driver.get(server.url + "/#/?sort=metric%3Aval%2Floss_step5&order=asc")
            time.sleep(3)
            driver.save_screenshot(str(out / "real-jobs.png"))
            driver.get(server.url + f"/#/compare?ids={maml},{reptile}")
            time.sleep(4)
            driver.save_screenshot(str(out / "real-compare.png"))
            driver.get(server.url + f"/#/sweeps/{sweep['id']}")
            time.sleep(4)
            driver.save_screenshot(str(out / "real-sweep.png"))
            client.post("/v1/models", json={"name": "sine"})
            client.post("/v1/models/sine/versions", json={"job_id": maml})
            client.post("/v1/models/sine/versions", json={"sweep_id": sweep["id"]})
            client.put("/v1/models/sine/aliases/production", json={"version": 1})
            client.put("/v1/models/sine/aliases/staging", json={"version": 2})
            driver.get(server.url + "/#/models/sine")
            time.sleep(3)
            driver.save_screenshot(str(out / "real-model.png"))
            driver.get(server.url + "/#/datasets")
            time.sleep(3)
            driver.save_screenshot(str(out / "real-datasets.png"))
            driver.get(server.url + f"/#/jobs/{failing}")
            time.sleep(4)
            log = driver.find_element(By.ID, "logs")
            driver.execute_script("arguments[0].scrollIntoView(); arguments[0].scrollTop = 0;", log)
            time.sleep(1)
            driver.save_screenshot(str(out / "real-failed-job-log.png"))
        finally:
            driver.quit()
            server.terminate()
    print(f"wrote {sorted(p.name for p in out.glob('real-*.png'))}")


if __name__ == "__main__":
    main()
