"""The web console beside the real daemon: an upload becomes a job and its video; a job the daemon
refuses shows its reason on the page; and the whole round in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from daemon_harness import DaemonHarness
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
