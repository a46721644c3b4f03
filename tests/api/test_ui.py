"""The web page at /ui, in a real headless Chromium driven by Selenium, against the real API, Redis
and Ray head of the session: sign in, see a job appear, watch its curve gain points while it runs
(across a dropped stream, with no gap and no duplicate), cancel it; a spec error shown beside its
field; another tenant's job out of reach. Screenshots go to tests/artifacts/ (git-ignored).

Needs Debian's `chromium` and `chromium-driver` (no browser download) and `selenium`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.api.conftest import job_body, make_record, wait_status

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[test]'")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for a browser to download
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--no-proxy-server"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def wait(driver, check, timeout: float, what: str):
    """Poll `check(driver)` (0.2 s apart) until it is truthy; fail with `what` after `timeout` s."""

    def safe(d):
        try:
            return check(d)
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(safe, message=f"timed out after {timeout} s waiting for {what}")


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def signed_out(driver, api):
    """The page, signed out (a new tab's session storage), at its sign-in form."""
    driver.get(f"{api.url}/ui/#/signin")
    driver.execute_script("sessionStorage.clear(); location.reload()")
    return wait(driver, lambda d: css(d, "#api-key"), 20, "the sign-in form")


def sign_in(driver, api, key: str):
    signed_out(driver, api).send_keys(key)
    css(driver, "#signin button[type=submit]").click()
    wait(driver, lambda d: css(d, "#jobs"), 20, "the jobs list")


def points(driver) -> int:
    return int(css(driver, '.chart[data-metric="reward/mean"]').get_attribute("data-points"))


def test_page_files_are_served_with_a_strict_policy(api, alpha):
    with api.client(None) as anyone:
        r = anyone.get("/ui", follow_redirects=True)
        assert r.status_code == 200 and str(r.url).endswith("/ui/") and "<script src=\"app.js\">" in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"] and r.headers["x-content-type-options"] == "nosniff"
        for path in ("app.js", "style.css", "vendor/js-yaml.min.js"):
            assert anyone.get(f"/ui/{path}").status_code == 200, path
        for path in ("missing.js", "../main.py", "vendor/js-yaml.LICENSE"):
            assert anyone.get(f"/ui/{path}").status_code == 404, path
    assert "/ui" not in alpha.get("/openapi.json").json()["paths"]  # not part of the REST API


def test_sign_in_watch_a_job_live_and_cancel_it(browser, served, keys, served_alpha, tiny, workdir):
    api, alpha = served, served_alpha  # the browser needs a server, the job Ray
    driver = browser
    signed_out(driver, api).send_keys("rlhf-not-a-key")
    css(driver, "#signin button[type=submit]").click()
    wait(driver, lambda d: "not accepted" in css(d, "#signin-error").text, 20, "the wrong key refused")
    sign_in(driver, api, keys["alpha"])
    assert keys["alpha"] not in driver.current_url
    assert driver.execute_script("return sessionStorage.getItem('rlhf.apiKey')") == keys["alpha"]
    assert driver.execute_script("return localStorage.length") == 0

    r = alpha.post("/v1/jobs", json=job_body(tiny, workdir, "ui-live", 100000))
    assert r.status_code == 201, r.text
    job = r.json()
    row = f'#jobs tr[data-job="{job["id"]}"]'
    wait(driver, lambda d: css(d, row), 30, "the new job in the list")  # the list refreshes itself
    css(driver, f"{row} a").click()
    wait(driver, lambda d: css(d, "#charts"), 20, "the job page")
    assert css(driver, "#ray-link").get_attribute("href") == job["dashboard_url"]

    # Curves fill from the live metrics stream; drop both streams mid-job (as a lost connection):
    # they resume from their last id and the curve goes on growing.
    wait(driver, lambda d: points(d) >= 2, 180, "two points on the reward curve")
    before = points(driver)
    driver.execute_script("window.rlhfUI.dropStreams()")
    wait(driver, lambda d: d.execute_script("return window.rlhfUI.streams.metrics.connects") >= 2, 30, "the metrics stream to reconnect")
    wait(driver, lambda d: points(d) >= before + 2, 120, "more points after the reconnect")
    driver.save_screenshot(str(ARTIFACTS / "ui-job-running.png"))

    css(driver, "#cancel").click()
    driver.switch_to.alert.accept()
    wait(driver, lambda d: css(d, "h1 .status").get_attribute("data-status") == "cancelled", 90, "the job to show cancelled")
    wait(driver, lambda d: css(d, "#live").text == "ended", 30, "both streams to end")
    history = alpha.get(f"/v1/jobs/{job['id']}/metrics", params={"limit": 1000}).json()["data"]
    steps = driver.execute_script("return window.rlhfUI.steps('reward/mean')")
    assert steps == [m["step"] for m in history] == list(range(1, len(history) + 1))  # no gap, no duplicate
    shown = [e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#events tr")][::-1]  # (newest first)
    events = alpha.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert shown == [e["id"] for e in events] and events[-1]["data"]["status"] == "cancelled"
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#checkpoints tr td.mono")) >= 1, 30, "the checkpoints")
    driver.save_screenshot(str(ARTIFACTS / "ui-job-cancelled.png"))
    assert wait_status(alpha, job["id"], {"cancelled"}, 30)["status"] == "cancelled"


BAD_SPEC = """api_version: rlhf/v1
name: bad-spec
model:
  path: {model}
data:
  train_file: {data}
rollout: {{n: 4, bogus: 1}}
rewards:
  - function: accuracy
optim:
  steps: 2
  lr: -1.0
"""


def test_spec_error_shows_beside_its_field(browser, served, keys, tiny):
    api = served  # the browser needs a server
    driver = browser
    driver.get(f"{api.url}/ui/")  # the page's storage (a blank page, where no test ran before, has none)
    if not driver.execute_script("return sessionStorage.getItem('rlhf.apiKey')"):
        sign_in(driver, api, keys["alpha"])
    driver.get(f"{api.url}/ui/#/submit")
    area = wait(driver, lambda d: css(d, "#spec-text"), 20, "the submit form")
    text = BAD_SPEC.format(model=tiny["model"], data=tiny["data"])
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", area, text)
    css(driver, "#submit-spec").click()

    lines = text.split("\n")
    for param, needle, why in (("optim.lr", "  lr: -1.0", "greater than 0"), ("rollout.bogus", "rollout: {n: 4, bogus: 1}", "unknown field")):
        note = wait(driver, lambda d, p=param: css(d, f'.field-error[data-param="{p}"]'), 20, f"the error of {param}")
        assert why in note.text
        line = lines.index(needle)
        assert note.get_attribute("data-line") == str(line + 1)
        # Beside its line: the note's top is where that line of the editor is.
        top = driver.execute_script(
            "const a = document.getElementById('spec-text'), s = getComputedStyle(a);"
            "return a.getBoundingClientRect().top + parseFloat(s.paddingTop) + arguments[0] * parseFloat(s.lineHeight) - a.scrollTop", line)
        assert abs(note.rect["y"] - top) < 2, (note.rect, top)
    assert css(driver, "#spec-errors").text == ""  # every error found its line
    driver.save_screenshot(str(ARTIFACTS / "ui-spec-error.png"))

    driver.execute_script("arguments[0].value = 'name: [unclosed\\nmodel: {}'; arguments[0].dispatchEvent(new Event('input'))", area)
    css(driver, "#submit-spec").click()
    wait(driver, lambda d: css(d, '.field-error[data-param="syntax"]'), 10, "the YAML syntax error")


def test_another_tenants_job_is_out_of_reach(browser, served, keys, redis_url):
    api = served  # the browser needs a server
    driver = browser
    theirs = make_record(redis_url, "beta", name="beta-secret")
    failed = make_record(redis_url, "alpha", name="ui-failed", status="failed")
    sign_in(driver, api, keys["alpha"])
    wait(driver, lambda d: css(d, f'#jobs tr[data-job="{failed}"]'), 20, "alpha's failed job in the list")
    assert not driver.find_elements(By.CSS_SELECTOR, f'#jobs tr[data-job="{theirs}"]')
    css(driver, "#job-filter").send_keys("beta-secret")
    wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr"), 10, "the filter to hide every row")

    driver.get(f"{api.url}/ui/#/jobs/{theirs}")
    wait(driver, lambda d: "No job" in css(d, "#job-missing").text, 20, "the missing-job notice")
    assert "beta-secret" not in driver.page_source

    driver.get(f"{api.url}/ui/#/jobs/{failed}")
    wait(driver, lambda d: "boom" in css(d, "#job-error .error-box").text, 20, "the failed job's error")
    css(driver, "#sign-out").click()
    wait(driver, lambda d: css(d, "#api-key"), 10, "the sign-in form after signing out")
    assert driver.execute_script("return sessionStorage.getItem('rlhf.apiKey')") is None


def test_an_async_jobs_page_shows_staleness_buffer_and_idle_curves(browser, served, keys, redis_url):
    """The curves of asynchronous training (and agents) appear once a job reports them, and only then:
    metrics written by the driver's own RedisReporter for one job, none for another."""
    from orchestrator.reporting.redis_reporter import RedisReporter

    api, driver = served, browser
    async_job = make_record(redis_url, "alpha", name="ui-async", status="succeeded")
    sync_job = make_record(redis_url, "alpha", name="ui-sync", status="succeeded")
    reporter = RedisReporter(redis_url, async_job)
    for step in range(1, 6):
        reporter.metrics(step, {"reward/mean": 0.1 * step, "staleness/mean": 0.5, "staleness/max": 1.0, "staleness/frac_0": 0.5,
                                "staleness/frac_1": 0.5, "async/buffer_fill": 0.25 * (step % 4), "async/rollout_idle_frac": 0.1,
                                "async/trainer_idle_frac": 0.4, "throughput/rollout_tokens_per_s": 900.0 + step,
                                "throughput/trainer_tokens_per_s": 2000.0, "off_policy/ratio_mean": 1.0, "agent/turns_per_episode": 2.0})
    reporter.close()
    RedisReporter(redis_url, sync_job).close()
    shown = ("staleness", "staleness/frac", "async/buffer_fill", "idle", "tokens_per_s", "off_policy", "agent/turns")

    def chart(metric: str):
        return css(driver, f'.chart[data-metric="{metric}"]')

    sign_in(driver, api, keys["alpha"])
    driver.get(f"{api.url}/ui/#/jobs/{async_job}")
    wait(driver, lambda d: chart("staleness").get_attribute("data-points") == "5", 30, "the staleness curve's 5 points")
    for metric in shown:
        assert chart(metric).is_displayed() and chart(metric).get_attribute("data-points") == "5", metric
    assert not chart("agent/errors").is_displayed()  # no metric of its own arrived
    assert chart("staleness").find_elements(By.CSS_SELECTOR, "polyline") and len(chart("idle").find_elements(By.CSS_SELECTOR, "polyline")) == 2
    driver.save_screenshot(str(ARTIFACTS / "ui-async-job.png"))

    driver.get(f"{api.url}/ui/#/jobs/{sync_job}")
    wait(driver, lambda d: chart("reward/mean").is_displayed(), 30, "the sync job's page")
    assert not any(chart(metric).is_displayed() for metric in shown)


def test_a_multi_turn_jobs_page_shows_its_newest_episodes(browser, served, keys, redis_url, operator):
    """A job with `rollout.agent` gets an Episodes section fed by GET /v1/jobs/{id}/trajectories; the
    turns of each episode open under its summary line. A job without an agent has none."""
    import json

    from api.storage import ArtifactStore
    from tests.api.test_trajectories import episode

    api, driver = served, browser
    agent_job = make_record(redis_url, "alpha", name="ui-agent", status="succeeded",
                            spec={"name": "ui-agent", "rollout": {"agent": {"environment": "calculator"}}})
    plain_job = make_record(redis_url, "alpha", name="ui-plain", status="succeeded")
    run = Path(ArtifactStore(operator["RLHF_API_STORAGE_ROOT"]).run_path("alpha", agent_job))
    run.mkdir(parents=True)
    records = [episode(step, sample, answer) for step in (1, 2) for sample, answer in ((0, "10542"), (1, "99"))]
    (run / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    sign_in(driver, api, keys["alpha"])
    driver.get(f"{api.url}/ui/#/jobs/{agent_job}")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#episodes details.episode")) == 4, 30, "the job's 4 episodes")
    shown = driver.find_elements(By.CSS_SELECTOR, "#episodes details.episode")
    assert [(e.get_attribute("data-step"), e.get_attribute("data-reward")) for e in shown] == [("2", "0"), ("2", "1"), ("1", "0"), ("1", "1")]
    assert shown[1].text.startswith("step 2 · episode 0 · reward 1 · ") and "2 turns" in shown[1].text and "1 tool calls" in shown[1].text
    shown[1].find_element(By.CSS_SELECTOR, "summary").click()
    turns = shown[1].find_elements(By.CSS_SELECTOR, ".turn")
    assert [t.find_element(By.CSS_SELECTOR, "b").text for t in turns] == ["system", "user", "assistant", "tool (calculator)", "assistant"]
    assert turns[3].find_element(By.CSS_SELECTOR, "pre").text == "10542"
    driver.save_screenshot(str(ARTIFACTS / "ui-agent-episodes.png"))

    driver.get(f"{api.url}/ui/#/jobs/{plain_job}")
    wait(driver, lambda d: css(d, "#checkpoints"), 30, "the plain job's page")
    assert not driver.find_elements(By.CSS_SELECTOR, "#episodes")
