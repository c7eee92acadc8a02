"""The web console beside the real daemon: an upload becomes a job and its video; a job the daemon
refuses shows its reason on the page; and the whole round in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonHarness
from heygem_daemon.views import local_time
from heygem_daemon.web.uploads import UPLOADS_DIR
from media_factory import write_speech_wav
from heygem_daemon.web.tokens import SCOPES, create_token
from web_rig import PASSWORDS, ApiClient, WebServer, web_settings

pytestmark = pytest.mark.daemon
ARTEFACTS = Path(__file__).resolve().parent / "artefacts" / "web"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    daemon = DaemonHarness(tmp_path_factory.mktemp("webd") / "base", web_settings()).start()
    web = WebServer(daemon.config_path).start()
    yield daemon, web
    web.stop()
    daemon.stop()


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> Path:
    return write_speech_wav(tmp_path_factory.mktemp("media") / "hello.wav", 1.0)


def test_an_upload_from_the_web_becomes_a_job_and_its_video_is_served(rig, voice, portrait_jpg):
    daemon, web = rig
    alice = web.client("alice")
    answer = alice.submit([alice.upload(voice), alice.upload(portrait_jpg)], name="from web", engine="preview",
                          preset="480p", upload=False)
    assert answer.status_code == 200, answer.text
    job = daemon.wait_job("from web")
    assert job.state == "done"
    page = alice.get("/jobs/from web").text
    task = daemon.store().tasks.select(job.id)[0]
    assert f'src="/jobs/from%20web/files/{Path(task.output).name}"' in page
    video = alice.get(f"/jobs/from web/files/{Path(task.output).name}", headers={"Range": "bytes=0-1023"})
    assert video.status_code == 206 and video.content == Path(task.output).read_bytes()[:1024]


def test_a_job_sent_through_the_api_is_taken_by_the_daemon_and_read_back_done_with_its_video(
        rig, portrait_jpg, tmp_path):
    daemon, web = rig
    store = daemon.store()
    client = ApiClient(web.url, create_token(store, "backoffice", "alice", SCOPES))
    voice = write_speech_wav(tmp_path / "api.wav", 1.25)  # its own audio: no duplicate of another test's job
    parts = [("files", ("hello.wav", voice.read_bytes())), ("files", ("anna.jpg", portrait_jpg.read_bytes()))]
    made = client.api("POST", "/jobs/multipart", files=parts, data={"options": json.dumps(
        {"name": "from api", "engine": "preview", "preset": "480p", "upload": False})})
    assert made.status_code == 201 and made.json()["ref"] == "from api", made.text
    job = daemon.wait_job("from api")
    shown = client.api("GET", "/jobs/from api").json()
    assert job.state == "done" and shown["state"] == "done" and shown["id"] == job.id and shown["progress"] == 1.0
    assert shown["owner"] == "alice" and [v["state"] for v in shown["videos"]] == ["done"]


def test_a_job_the_daemon_refuses_shows_its_reason_and_hint_on_the_page(rig, voice, no_face_jpg):
    daemon, web = rig
    alice = web.client("alice")
    answer = alice.submit([alice.upload(voice), alice.upload(no_face_jpg)], name="no face", engine="preview",
                          preset="480p")
    assert answer.status_code == 200, answer.text
    job = daemon.wait_job("no face")
    assert job.state == "failed"
    page = alice.get("/jobs/no face").text
    assert "Why it failed" in page and job.error["reason"] in page.replace("&#39;", "'")


def logged_in_browser(url: str):
    """Debian's chromium, headless, logged in as alice (the login page's screenshot taken on the way)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.get(url + "/login")
    driver.save_screenshot(str(ARTEFACTS / "login.png"))
    driver.find_element(By.NAME, "user").send_keys("alice")
    driver.find_element(By.NAME, "password").send_keys(PASSWORDS["alice"])
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith("/jobs"))
    return driver


needs_chromium = pytest.mark.skipif(shutil.which("chromedriver") is None,
                                    reason="chromium-driver missing (.ci/run installs it)")


@pytest.fixture(scope="module")
def browser(rig):
    """One Chromium for the module's browser tests (starting one is most of their cost)."""
    driver = logged_in_browser(rig[1].url)
    yield driver
    driver.quit()


@needs_chromium
def test_in_a_browser_a_pair_uploaded_through_the_page_reaches_done_live_and_plays(rig, browser, tmp_path,
                                                                                  portrait_jpg):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon, web = rig
    voice = write_speech_wav(tmp_path / "browser.wav", 1.5)  # not the other tests' pair: no duplicate
    driver = browser
    wait = WebDriverWait(driver, 90, ignored_exceptions=(StaleElementReferenceException,))

    driver.get(web.url + "/upload")
    driver.execute_script("document.getElementById('pick').hidden = false")
    driver.find_element(By.ID, "pick").send_keys(f"{voice}\n{portrait_jpg}")
    driver.find_element(By.NAME, "name").send_keys("browser job")
    send = driver.find_element(By.ID, "send")
    wait.until(lambda d: send.is_enabled())
    driver.save_screenshot(str(ARTEFACTS / "upload.png"))
    send.click()

    wait.until(lambda d: "/jobs/browser" in d.current_url)
    # No reload from here on: the page follows the job through server-sent events.
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#live h1 .state").text == "done")
    assert daemon.job("browser job").state == "done"
    # Delivery reported is the last change the page shows; after it, the fragment stays put.
    wait.until(lambda d: "delivery reported" in d.find_element(By.ID, "live").text)
    copy = driver.find_element(By.CSS_SELECTOR, "button[data-copy]")
    copy.click()
    wait.until(lambda d: copy.get_attribute("data-copied") == "1")
    video = driver.find_element(By.TAG_NAME, "video")
    driver.execute_script("arguments[0].muted = true; arguments[0].play()", video)
    wait.until(lambda d: d.execute_script("return arguments[0].currentTime > 0.2", video))
    driver.save_screenshot(str(ARTEFACTS / "job.png"))

    driver.get(web.url + "/jobs")
    # The list is live: an update may replace the table between finding it and reading it.
    wait.until(lambda d: "browser job" in d.find_element(By.CSS_SELECTOR, "table.jobs").text)
    driver.save_screenshot(str(ARTEFACTS / "jobs.png"))
    driver.get(web.url + "/health")
    driver.find_element(By.XPATH, "//button[text()='Run the checks']").click()  # the live doctor, on request
    wait.until(lambda d: "database" in d.find_element(By.CSS_SELECTOR, "table.doctor").text)
    driver.save_screenshot(str(ARTEFACTS / "health.png"))


@needs_chromium
def test_in_a_browser_an_upload_cut_by_a_reload_resumes_on_the_same_upload(rig, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _daemon, web = rig
    big = tmp_path / "long take.wav"
    big.write_bytes(os.urandom(8 * 2**20))
    driver = browser
    wait = WebDriverWait(driver, 60)
    uploads = web.cfg.folder("work") / UPLOADS_DIR
    try:
        # A slow link, so the reload lands half way through the file.
        driver.set_network_conditions(offline=False, latency=5, upload_throughput=2 * 2**20,
                                      download_throughput=50 * 2**20)
        driver.get(web.url + "/upload")

        def pick() -> None:
            driver.execute_script("document.getElementById('pick').hidden = false")
            driver.find_element(By.ID, "pick").send_keys(str(big))
        pick()
        progress = driver.find_element(By.CSS_SELECTOR, "#files progress")
        wait.until(lambda d: 0.1 < float(progress.get_attribute("value")) < 0.9)
        stored = driver.execute_script(
            "return Object.keys(localStorage).filter(k => k.startsWith('tus::')).map(k => localStorage[k])")
        first = json.loads(stored[0])["uploadUrl"].rsplit("/", 1)[1]
        driver.refresh()
        pick()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#files .note").text == "uploaded")
        assert (uploads / first / "data").read_bytes() == big.read_bytes()  # the first upload, finished
        mine = [p for p in uploads.iterdir() if (p / "info.json").exists()
                and json.loads((p / "info.json").read_text())["name"] == "long take.wav"]
        assert [p.name for p in mine] == [first]
    finally:
        driver.delete_network_conditions()


@needs_chromium
def test_in_a_browser_a_file_added_twice_is_one_row_files_can_be_removed_and_a_double_click_sends_once(
        rig, browser, tmp_path, portrait_jpg, no_face_jpg):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon, web = rig
    driver, wait = browser, WebDriverWait(browser, 60)
    voice = write_speech_wav(tmp_path / "twice.wav", 1.2)
    driver.get(web.url + "/upload")
    driver.execute_script("document.getElementById('pick').hidden = false")
    pick = driver.find_element(By.ID, "pick")

    def rows() -> list:
        return driver.find_elements(By.CSS_SELECTOR, "#files li")

    def uploaded() -> bool:
        return all(r.find_element(By.CLASS_NAME, "note").text == "uploaded" for r in rows())
    pick.send_keys(str(no_face_jpg))
    pick.send_keys(str(portrait_jpg))
    wait.until(lambda d: len(rows()) == 2 and uploaded())
    driver.find_element(By.ID, "send").click()  # two portraits, no audio: the server refuses, with its reason
    outcome = driver.find_element(By.ID, "outcome")
    wait.until(lambda d: outcome.text.startswith("Refused:"))
    assert "What to do:" in outcome.text and driver.find_element(By.ID, "send").is_enabled()

    pick.send_keys(str(voice))
    wait.until(lambda d: len(rows()) == 3 and uploaded())
    pick.send_keys(str(voice))  # the same file again: pointed out on its row, no second row or upload
    wait.until(lambda d: "in the list already" in rows()[2].text)
    assert len(rows()) == 3
    driver.save_screenshot(str(ARTEFACTS / "upload-refused.png"))
    no_face_id = next(p.name for p in (web.cfg.folder("work") / UPLOADS_DIR).iterdir()
                      if (p / "info.json").exists()
                      and json.loads((p / "info.json").read_text())["name"] == "no_face.jpg")
    rows()[0].find_element(By.CSS_SELECTOR, "button.remove").click()
    wait.until(lambda d: len(rows()) == 2)
    wait.until(lambda d: not (web.cfg.folder("work") / UPLOADS_DIR / no_face_id).exists())  # gone on the server

    driver.find_element(By.NAME, "name").send_keys("twice clicked")
    driver.execute_script("const b = document.getElementById('send'); b.click(); b.click();")
    wait.until(lambda d: "/jobs/twice" in d.current_url)
    audit = [json.loads(line) for line in (web.cfg.folder("logs") / "audit.log").read_text().splitlines()]
    sent = [a["event"] for a in audit if a.get("job") == "twice clicked" and a["event"].startswith("web upload")]
    assert sent == ["web upload"]  # one submit: no second one refused (or worse) behind it
    assert daemon.wait_job("twice clicked").state == "done"


@needs_chromium
def test_in_a_browser_pages_kept_in_the_back_forward_cache_hold_no_event_stream(rig, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    _daemon, web = rig
    console = web.server.config.app.state.console
    driver, wait = browser, WebDriverWait(browser, 30)
    for n in range(4):  # four live pages, as many job pages visited one after another
        driver.get(f"{web.url}/jobs?q=visit-{n}")
        wait.until(lambda d: console.live_streams >= 1)
        driver.execute_script("window.keptInCache = true")
    for _ in range(3):
        driver.back()
    driver.forward()
    # Only the page on screen holds a stream (six held ones would block every further request to the host).
    wait.until(lambda d: console.live_streams == 1)
    assert "visit-1" in driver.current_url
    assert driver.execute_script("return window.keptInCache === true"), "the page did not come from the cache"
    driver.get(web.url + "/jobs")  # and the host still answers at once
    wait.until(lambda d: console.live_streams == 1)


@needs_chromium
def test_in_a_browser_at_phone_width_every_page_fits_without_sideways_scrolling(rig, browser, tmp_path,
                                                                               portrait_jpg):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon, web = rig
    alice = web.client("alice")
    name = "a job whose name is long enough to wrap on a phone screen"
    voice = write_speech_wav(tmp_path / "phone.wav", 1.3)
    assert alice.submit([alice.upload(voice), alice.upload(portrait_jpg)], name=name, engine="preview",
                        preset="480p", upload=False).status_code == 200
    daemon.wait_job(name)
    driver, wait = browser, WebDriverWait(browser, 60)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    widths = {}
    try:
        for page, path in (("jobs", "/jobs"), ("job", f"/jobs/{name}"), ("upload", "/upload"), ("health", "/health")):
            driver.get(web.url + path)
            if page == "upload":
                driver.execute_script("document.getElementById('pick').hidden = false")
                driver.find_element(By.ID, "pick").send_keys(f"{voice}\n{portrait_jpg}")
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#files li")) == 2)
                driver.execute_script("document.getElementById('pick').hidden = true")  # as a person sees it
            if page == "health":
                driver.find_element(By.XPATH, "//button[text()='Run the checks']").click()
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.doctor"))
            driver.save_screenshot(str(ARTEFACTS / f"{page}-390.png"))  # (captureBeyondViewport hangs at times)
            widths[page] = driver.execute_script("return document.documentElement.scrollWidth")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert widths == {"jobs": 390, "job": 390, "upload": 390, "health": 390}


def test_the_daemon_beats_its_heartbeat_and_the_health_page_shows_it(rig):
    from heygem_daemon.ops.daemon_state import HEARTBEAT_SECONDS, read_state

    daemon, web = rig
    deadline = time.monotonic() + 3 * HEARTBEAT_SECONDS
    # Written after the start, not only at it (the module's other tests gave it time to beat already).
    while (state := read_state(daemon.folder("state")))["updated"] < state["started"] + HEARTBEAT_SECONDS:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    page = web.client("alice").get("/health").text
    assert f"since {local_time(state['started'])}" in page and "Last heartbeat" in page and "stuck" not in page
