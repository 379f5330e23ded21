"""The service's web page in a real headless browser (Debian's chromium + chromium-driver,
driven by selenium) against a real server (`jaxdp serve`: uvicorn and a spawned worker):
key, file, perturbed preview, upload, train, progress, verified download. And the browser's
perturbation against jaxdp.perturb's, in distribution.

Without chromium these tests skip, unless JAXDP_REQUIRE_BROWSER=1 (CI sets it): then they fail.
"""

import json
import os
import shutil
import urllib.request

import numpy as np
import pytest
from scipy import stats
from test_serve import WORDS, tickets
from test_serve_process import serve

from jaxdp import perturb
from jaxdp.serve import db

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "Debian's chromium and chromium-driver are not installed"
        if os.environ.get("JAXDP_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            # "Download all" saves each file: the permission a user grants at Chrome's prompt.
            "profile.default_content_setting_values.automatic_downloads": 1,
        },
    )
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    """`jaxdp serve` on 127.0.0.1 with one worker, public embeddings of WORDS, and a tenant."""
    workdir = tmp_path_factory.mktemp("service")
    vectors = np.random.default_rng(3).normal(size=(len(WORDS), 8)).astype(np.float32)
    perturb.Embeddings(tuple(WORDS), vectors).save(workdir / "embeddings")
    sessions = db.connect(db.default_url(workdir))
    key = db.create_tenant(sessions, "clinic", 20.0)
    db.add_base_model(sessions, "tiny-gpt2", base_model)
    with serve(workdir, "--heartbeat-interval", "1") as (_, url, _):
        yield {"url": url, "key": key, "workdir": workdir}


def wait_text(driver, element_id, text, timeout=30):
    WebDriverWait(driver, timeout).until(
        ec.text_to_be_present_in_element((By.ID, element_id), text)
    )
    return driver.find_element(By.ID, element_id).text


def api(server, path):
    request = urllib.request.Request(
        server["url"] + path, headers={"Authorization": f"Bearer {server['key']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_the_page_perturbs_uploads_trains_and_downloads(browser, server, base_model, tmp_path):
    from test_perturb import MULTILINGUAL

    records = tickets(30, seed=5).decode().splitlines() + list(MULTILINGUAL[:4])
    upload = tmp_path / "tickets.txt"
    # A repeated line is dropped in the page, before perturbing (one text, one record).
    # So is one that differs only in surrounding spaces (the server's canonical form).
    upload.write_text("\n".join([*records, records[3], records[5] + "  "]) + "\n")
    d = browser
    d.get(server["url"] + "/")
    d.find_element(By.ID, "key").send_keys("jdp_not-a-key")
    d.find_element(By.ID, "use-key").click()
    assert "key was not accepted" in wait_text(d, "who", "not accepted")  # words, not "401: ..."
    d.find_element(By.ID, "key").clear()
    d.find_element(By.ID, "key").send_keys(server["key"])
    d.find_element(By.ID, "use-key").click()
    assert "Signed in as clinic" in wait_text(d, "who", "Signed in")
    check_layout(d, tmp_path, "signed-in")
    # The file is perturbed in the page; the preview shows both columns.
    d.find_element(By.ID, "file").send_keys(str(upload))
    eps = d.find_element(By.ID, "eps-word")
    eps.clear()
    eps.send_keys("3")
    d.find_element(By.ID, "perturb").click()
    wait_text(d, "perturb-status", "Done")
    assert (
        "34 records perturbed (2 repeated lines dropped" in d.find_element(By.ID, "guarantee").text
    )
    assert (
        "Not covered: the number of records, their order" in d.find_element(By.ID, "guarantee").text
    )
    plain = d.find_element(By.ID, "plain").text
    assert "% of the words in your file were replaced" in plain
    assert "epsilon = 3 per unit of embedding distance" in d.find_element(By.ID, "guarantee").text
    rows = d.find_elements(By.CSS_SELECTOR, "#preview-rows tr")
    preview = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [original for original, _ in preview] == records[:20]
    for original, perturbed in preview:
        assert len(perturbed.split()) == len(original.split())
        assert set(perturbed.split()) <= set(WORDS)
    assert any(o != p for o, p in preview)  # at epsilon 3 on these vectors, words do change
    # Upload: read the request body the page sends (fetch wrapped: every FormData part).
    d.execute_script(
        """
        window.sentBodies = [];
        const send = window.fetch;
        window.fetch = async (url, options = {}) => {
          if (options.body instanceof FormData) {
            const parts = [];
            for (const [name, value] of options.body.entries())
              parts.push([name, typeof value === "string" ? value : await value.text(),
                          typeof value === "string" ? null : value.name]);
            window.sentBodies.push(parts);
          }
          return send(url, options);
        };
        """
    )
    d.find_element(By.ID, "upload").click()
    assert "34 records" in wait_text(d, "upload-status", "Uploaded")
    (parts,) = d.execute_script("return window.sentBodies;")
    sent = "\n".join(str(p) for part in parts for p in part)
    assert sent.isascii()  # no character of the originals' other scripts left the browser
    for line in MULTILINGUAL[:4]:
        for word in perturb.WORD.findall(line):
            if word.lower() not in WORDS:
                assert word not in sent and word.lower() not in sent, word
    assert upload.name not in sent
    assert dict((name, value) for name, value, _ in parts)["name"].startswith("dataset of ")
    (dataset,) = api(server, "/api/datasets")
    assert dataset["records"] == 34 and dataset["local_epsilon_declared_by_uploader"] == 3.0
    assert dataset["name"] != upload.name  # the file's name never left the browser
    (path,) = server["workdir"].glob(f"tenants/*/datasets/{dataset['id']}.jsonl")
    stored = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert stored[:20] == [p for _, p in preview]
    measured = perturb.changed_fraction(records, stored)  # the page's number, recomputed
    assert f"{100 * measured:.1f}% of words changed" == d.find_element(By.ID, "changed").text
    # After the upload the page holds only the perturbed text: no original record is in it
    # (as a cell of the table, shown or hidden), and the originals' other scripts are gone.
    cells = d.execute_script("return [...document.querySelectorAll('td')].map(c => c.textContent);")
    perturbed_texts = {p for _, p in preview}
    assert perturbed_texts <= set(cells)
    assert not [o for o in records if o in cells and o not in perturbed_texts]
    html = d.page_source
    for line in MULTILINGUAL[:4]:
        for word in perturb.WORD.findall(line):
            if word.lower() not in WORDS:
                assert word not in html, word
    check_layout(d, tmp_path, "uploaded")
    # Train: the form's settings, progress as it runs, then the result and downloads.
    Select(d.find_element(By.ID, "base")).select_by_value("tiny-gpt2")  # the admin's list
    settings = {"target-eps": "8", "epochs": "1", "batch": "10",
                "lora-rank": "2", "lr": "0.01", "block": "16"}  # fmt: skip
    for element_id, value in settings.items():
        field = d.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)
    assert (
        Select(d.find_element(By.ID, "dataset")).first_selected_option.get_attribute("value")
        == dataset["id"]
    )  # the upload is chosen
    d.find_element(By.ID, "train").click()
    train = d.find_element(By.ID, "train")
    assert train.text == "Planning…" and not train.is_enabled()  # no second click meanwhile
    assert "queued: planned" in wait_text(d, "job-status", "queued")
    assert train.text == "Train" and train.is_enabled()
    wait_text(d, "progress-text", "step", timeout=240)
    # A reload keeps the lists and follows the running job again (the key is in the session).
    d.refresh()
    assert "Signed in as clinic" in wait_text(d, "who", "Signed in")
    WebDriverWait(d, 30).until(lambda _: d.find_elements(By.CSS_SELECTOR, "#dataset-rows tr"))
    assert len(d.find_elements(By.CSS_SELECTOR, "#job-rows tr")) == 1
    wait_text(d, "progress-text", "step 4 of 4", timeout=240)  # 1 epoch, q = 10 / 34
    assert "succeeded" in wait_text(d, "job-status", "succeeded", timeout=60)
    check_layout(d, tmp_path, "done")
    result = d.find_element(By.ID, "result").text
    assert (
        "per record, DP-SGD" in result and "ε = 3 per word, as declared by the uploader" in result
    )
    assert "not a sum" in result
    (job,) = api(server, "/api/jobs")
    assert job["state"] == "succeeded" and job["plan"]["steps"] == 4
    d.find_element(By.ID, "download-all").click()
    names = set(job["artifacts"])
    WebDriverWait(d, 60).until(
        lambda _: (
            {p.name for p in d.downloads.iterdir()} >= names
            and len(d.find_elements(By.CSS_SELECTOR, "#artifacts .verified")) == len(names)
        )
    )
    privacy = json.loads((d.downloads / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(job["result"]["epsilon"])


def check_layout(d, tmp_path, name):
    """At desktop and phone widths: a screenshot that is not blank, nothing wider than the
    screen, and a label for every field."""
    from PIL import Image

    for width, height in ((1280, 900), (390, 844)):
        d.set_window_size(width, height)
        overflow = d.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;"
        )
        assert overflow <= 0, (name, width, overflow)
        unlabelled = d.execute_script(
            """
            return [...document.querySelectorAll("input, select")]
              .filter(e => e.offsetParent !== null && !(e.labels && e.labels.length))
              .map(e => e.id);
            """
        )
        assert unlabelled == [], (name, width, unlabelled)
        path = tmp_path / f"{name}-{width}.png"
        assert d.save_screenshot(str(path))
        image = Image.open(path).convert("L")
        assert image.size[0] >= width * 0.9
        assert len(image.getcolors(maxcolors=1 << 20)) > 8  # text was drawn, not a blank page
    d.set_window_size(1280, 900)


def test_browser_and_python_split_and_perturb_every_script_alike(browser, server):
    """The same words in both implementations, for text in any script; nothing but vocabulary
    words and ASCII layout comes out of the browser's mechanism."""
    from test_perturb import MULTILINGUAL

    browser.get(server["url"] + "/")
    js = browser.execute_script(
        """
        const [texts, words, flat, dim] = arguments;
        const emb = JaxdpPerturb.makeEmbeddings(words, new Float32Array(flat), dim);
        return texts.map(t => [t.match(JaxdpPerturb.WORD) || [],
                               JaxdpPerturb.perturbText(t, 0.1, emb).text]);
        """,
        list(MULTILINGUAL),
        list(WORDS),
        np.random.default_rng(2).normal(size=(len(WORDS), 3)).ravel().tolist(),
        3,
    )
    for text, (js_words, out) in zip(MULTILINGUAL, js, strict=True):
        assert js_words == perturb.WORD.findall(text)
        assert out.isascii() and set(perturb.WORD.findall(out)) <= set(WORDS)
        assert perturb.WORD.sub("W", out) == perturb.WORD.sub("W", text)


def test_browser_and_python_perturbation_agree_in_distribution(browser, server):
    """Two-sample chi-square tests on the outputs for each input word of a fixed vocabulary."""
    words = ("a", "b", "c", "d", "e", "f")
    vectors = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0.5], [-1, 1]], np.float32)
    emb = perturb.Embeddings(words, vectors)
    draws, eps = 4000, 2.0
    browser.get(server["url"] + "/")
    js_counts = browser.execute_script(
        """
        const [words, flat, dim, draws, eps] = arguments;
        const emb = JaxdpPerturb.makeEmbeddings(words, new Float32Array(flat), dim);
        return [...words, "患者"].map(w => {
          const counts = Object.fromEntries(words.map(v => [v, 0]));
          for (let i = 0; i < draws; i++) counts[JaxdpPerturb.perturbWord(w, eps, emb)] += 1;
          return words.map(v => counts[v]);
        });
        """,
        list(words),
        vectors.ravel().tolist(),
        2,
        draws,
        eps,
    )
    rng = np.random.default_rng(6)

    def py_counts(word, epsilon):
        out = perturb.perturb_words([word] * draws, epsilon, emb, rng)
        return [out.count(v) for v in words]

    def p_value(a, b):
        table = np.array([a, b])
        return stats.chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue

    for word, counts in zip(words + ("患者",), js_counts, strict=True):  # and an unknown word
        assert sum(counts) == draws
        assert p_value(counts, py_counts(word, eps)) > 1e-4, word
    # The test can fail: the Python mechanism at another epsilon is told apart.
    assert p_value(js_counts[0], py_counts("a", 1.5 * eps)) < 1e-6
