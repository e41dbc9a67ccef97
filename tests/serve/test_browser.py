"""End to end in a real headless browser: Debian's chromium + chromedriver driven by Selenium.

Uploads the JPEG-Baseline CR DICOM (or, without ../shared, a DICOM built from real NIH pixels),
waits for the findings and the report, toggles the overlay, checks that the non-CXR object is
flagged and that a corrupt file is refused on screen, and saves a screenshot.

Environment: CXRVIT_SERVE_MODEL=RUN serves that bundle instead of the random test bundle, and
CXRVIT_SCREENSHOT=FILE.png keeps the screenshot there (how docs/img/serve.png was made).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no browser installed: needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver; .ci/run installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(serve_bundle):
    import uvicorn

    from cxrvit.inference.bundle import load_bundle
    from cxrvit.serve.analysis import Settings
    from cxrvit.serve.app import create_app

    model = os.environ.get("CXRVIT_SERVE_MODEL")
    bundle = load_bundle(model) if model else serve_bundle
    app = create_app(bundle, source=model or "test-bundle", settings=Settings(max_upload_bytes=4 * 2**20))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1050"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].value = '';", field)  # the same file twice must still fire 'change'
    field.send_keys(str(Path(path).resolve()))


def test_upload_findings_overlay_report_and_refusals(server, browser, dicoms, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    wait = WebDriverWait(d, 120)
    d.get(server + "/")
    wait.until(lambda drv: "labels" in drv.find_element(By.ID, "model-info").text)

    # 1. the chest DICOM: findings table, report, overlay
    _upload(d, dicoms["cxr"])
    wait.until(lambda drv: "IMPRESSION:" in drv.find_element(By.ID, "report").text)
    rows = d.find_elements(By.CSS_SELECTOR, "#findings tbody tr")
    assert len(rows) >= 3
    probs = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows]
    assert probs == sorted(probs, reverse=True)
    assert all(("above" in r.get_attribute("class")) == ("above" in r.text) for r in rows)
    report = d.find_element(By.ID, "report").text
    assert "FINDINGS:" in report and "NOT A DIAGNOSIS" in report
    assert d.find_element(By.ID, "qc").is_displayed() is False
    header = d.find_element(By.ID, "dicom").text
    assert "hidden" in header and ("CR" in header if dicoms["real"] else "DX" in header or "CR" in header)

    overlay = d.find_element(By.ID, "overlay")
    wait.until(lambda drv: overlay.get_attribute("src").startswith("data:image/png"))
    gradcam_src = overlay.get_attribute("src")
    Select(d.find_element(By.ID, "method")).select_by_value("rollout")
    assert overlay.get_attribute("data-method") == "rollout" and overlay.get_attribute("src") != gradcam_src
    slider = d.find_element(By.ID, "opacity")
    d.execute_script("arguments[0].value = 35; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert abs(float(overlay.value_of_css_property("opacity")) - 0.35) < 0.01
    d.find_element(By.ID, "show-overlay").click()
    assert not overlay.is_displayed()
    d.find_element(By.ID, "show-overlay").click()
    Select(d.find_element(By.ID, "method")).select_by_value("gradcam")
    d.find_element(By.CSS_SELECTOR, "input[name=form][value=short]").click()
    assert "short form" in d.find_element(By.ID, "report").text
    shot = Path(os.environ.get("CXRVIT_SCREENSHOT") or tmp_path / "serve.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # 2. the non-CXR DICOM: scored, with the QC warning on screen
    _upload(d, dicoms["not_cxr"])
    qc = wait.until(EC.visibility_of_element_located((By.ID, "qc")))
    wait.until(lambda drv: "not a projection radiograph" in qc.text)
    assert "not a frontal chest radiograph" in qc.text

    # 3. a corrupt file: a readable refusal on the page
    _upload(d, dicoms["corrupt"])
    err = wait.until(EC.visibility_of_element_located((By.ID, "error")))
    assert "HTTP 422" in err.text and "cannot read this DICOM file" in err.text

    # 4. over the server's upload limit (4 MB here): refused before sending, with the limit named
    big = tmp_path / "big.dcm"
    big.write_bytes(dicoms["cxr"].read_bytes() * (5 * 2**20 // dicoms["cxr"].stat().st_size + 1))
    _upload(d, big)
    wait.until(lambda drv: "the limit is 4 MB" in drv.find_element(By.ID, "error").text)
