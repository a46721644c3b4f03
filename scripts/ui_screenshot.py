"""docs/ui-job.png: the web page of the quickstart's job (examples/grpo.yaml) run over REST to its end.

Starts what the tests start (a redis-server, a Ray head, `rlhf serve`, all on loopback), builds the
tiny model, registers it, uploads the quickstart's prompts as a tenant, submits examples/grpo.yaml
with the registry's model and the uploaded file in place of its paths, waits for it to succeed and
takes the page in headless Chromium (Debian's chromium and chromium-driver).

    python scripts/ui_screenshot.py [--out docs/ui-job.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.auth import add_key  # noqa: E402
from orchestrator.entrypoints.tiny_model import init_model  # noqa: E402
from tests.api.conftest import ApiServer, api_env  # noqa: E402
from tests.conftest import RayHead, free_port, stop_group, wait_until  # noqa: E402


def start_redis(tmp: Path):
    import subprocess

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--appendonly", "yes", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import redis

    wait_until(redis.Redis(host="127.0.0.1", port=port).ping, 15, f"redis-server on port {port}")
    return proc, f"redis://127.0.0.1:{port}/0"


def quickstart_body(file_id: str) -> dict:
    """examples/grpo.yaml as a tenant submits it: the registry's model and an uploaded file, no server paths."""
    spec = yaml.safe_load((ROOT / "examples" / "grpo.yaml").read_text())
    spec["model"]["path"] = "tiny"
    spec["data"]["train_file"] = file_id
    spec.pop("output_dir", None)
    return spec


def browser():
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1055",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--no-proxy-server"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui-job.png")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the job may take (default 900)")
    args = parser.parse_args(argv)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="shot-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        procs, ray_head, api, driver = [], None, None, None
        try:
            redis_proc, redis_url = start_redis(tmp)
            procs.append(redis_proc)
            ray_head = RayHead().wait_up()
            model = init_model(tmp / "tiny-model")
            registry = tmp / "registry.yaml"
            registry.write_text(yaml.safe_dump({"models": {"tiny": {"path": str(model), "description": "2-layer random-weight Qwen2"}}}))
            key = add_key(tmp / "keys.yaml", "demo")
            operator = {"RLHF_API_STORAGE_ROOT": str(tmp / "artifacts"), "RLHF_API_REGISTRY_FILE": str(registry)}
            port = free_port()
            api = ApiServer(api_env(redis_url, ray_head, tmp / "keys.yaml", port, operator), port, tmp / "api.log")
            api.start()
            with api.client(key) as c:
                data = (ROOT / "examples" / "arithmetic" / "data" / "train.jsonl").read_bytes()
                r = c.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "train"})
                r.raise_for_status()
                r = c.post("/v1/jobs", json=quickstart_body(r.json()["id"]))
                if r.status_code != 201:
                    raise SystemExit(f"submit failed: {r.status_code} {r.text}")
                job = r.json()["id"]
                print(f"submitted {job}; waiting for it to end (at most {args.timeout:.0f} s)", flush=True)
                t0 = time.monotonic()
                while (status := c.get(f"/v1/jobs/{job}").json()["status"]) not in ("succeeded", "failed", "cancelled"):
                    if time.monotonic() - t0 > args.timeout:
                        raise SystemExit(f"job {job} still {status} after {args.timeout:.0f} s")
                    time.sleep(2)
                metrics = c.get(f"/v1/jobs/{job}/metrics", params={"limit": 1000}).json()["data"]
            rewards = [m["values"]["reward/mean"] for m in metrics if m["values"].get("reward/mean") is not None]
            print(f"job {status} in {time.monotonic() - t0:.0f} s; reward/mean {rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else status)
            if status != "succeeded":
                raise SystemExit(f"job {status}: see {tmp / 'api.log'}")
            driver = browser()
            driver.get(f"{api.url}/ui/#/signin")
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, "#api-key")).send_keys(key)
            driver.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
            driver.get(f"{api.url}/ui/#/jobs/{job}")
            WebDriverWait(driver, 30).until(lambda d: int(d.find_element(By.CSS_SELECTOR, '.chart[data-metric="reward/mean"]').get_attribute("data-points")) >= len(rewards))
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#checkpoints tr td.mono"))
            time.sleep(1)  # the charts' last paint
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out}")
        finally:
            if driver is not None:
                driver.quit()
            if api is not None:
                api.stop()
            if ray_head is not None:
                ray_head.stop()
            for p in procs:
                stop_group(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
