"""The web dashboard (service/static) in a real headless browser: Debian's chromium driven by Playwright.

One `pbs2p serve` child process on a seeded tiny Llama; the browser signs in, submits a job through the form
(generated from /openapi.json: one input per config field), follows it live to SUCCEEDED and opens its report;
it compares finished jobs side by side.
Where chromium is missing the tests skip (fail under CI).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pbs2p.core.config import Ablations, CompressionConfig
from pbs2p.service.cli.demo import start_service, stop_service
from pbs2p.service.jobstore import JobRow, JobState, JobStore
from pbs2p.service.settings import Settings
from pbs2p.testing.finished import Finished, add_finished_job
from pbs2p.testing.tiny import make_model, save_tokenizer, write_text

CHROMIUM = Path(os.environ.get("PBS2P_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LAYERS = 2
TIMEOUT_MS = 30_000


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    msg = f"DASHBOARD TESTS NOT RUN: {why}"
    if os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need(CHROMIUM.is_file(), f"no chromium at {CHROMIUM} (apt-get install -y chromium; make venv does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -e .[dev])")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dashboard_models")
    make_model(root / "tiny", layers=LAYERS)
    save_tokenizer(root / "tiny")
    return {"root": root, "model": (root / "tiny").resolve(), "calib": write_text(root / "calib.txt", docs=8).resolve()}


@pytest.fixture(scope="module")
def service(browser: Any, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("dashboard_service")
    key = JobStore(Settings(data_dir=data).db_url).create_key("tenant")
    env = {
        "PBS2P_MODEL_ROOTS": str(files["root"]),
        "PBS2P_POLL_SECONDS": "0.3",
        "PBS2P_RAY_NUM_CPUS": "2",
        "OMP_NUM_THREADS": "1",
    }
    proc, url = start_service(data, env)
    try:
        yield {"url": url, "key": key, "log": str(data / "service.log")}
    finally:
        stop_service(proc)
        kill_leftovers(data)


def kill_leftovers(data: Path) -> None:
    """SIGKILL what this service left running: Ray's agents outlive a terminated `pbs2p serve` (re-parented to
    init, deaf to SIGTERM). They are found by the PBS2P_DATA_DIR they inherited, unique to this test."""
    mark = f"PBS2P_DATA_DIR={data}".encode()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            pass


@pytest.fixture
def page(browser: Any, service: dict[str, str]) -> Iterator[Any]:
    """A fresh context (empty sessionStorage); `page.api` lists (method, url, status) of every /v1 response."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.api = []
    pg.errors = []
    pg.on("response", lambda r: "/v1/" in r.url and pg.api.append((r.request.method, r.url, r.status)))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: "Content Security Policy" in m.text and pg.errors.append(m.text))  # CSP kept
    yield pg
    context.close()
    assert not pg.errors, pg.errors  # no uncaught JavaScript error on any page


def headers(service: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {service['key']}"}


def job_body(files: dict[str, Path], **config: Any) -> dict[str, Any]:
    cfg = {"calib": str(files["calib"]), "calib_samples": 4, "seqlen": 32, "block_size": 32, "salient_columns": 2}
    return {"model": str(files["model"]), "config": {**cfg, **config}}


@pytest.fixture(scope="module")
def other_job(service: dict[str, str], files: dict[str, Path]) -> str:
    """A job submitted over the API and cancelled at once: its id must never reach a page without a key."""
    r = httpx.post(f"{service['url']}/v1/jobs", json=job_body(files), headers=headers(service))
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    httpx.post(f"{service['url']}/v1/jobs/{job}/cancel", headers=headers(service)).raise_for_status()
    return str(job)


def sign_in(page: Any, service: dict[str, str], key: str | None = None) -> None:
    page.goto(f"{service['url']}/")
    page.fill("#key", key or service["key"])
    page.click("#signin button[type=submit]")


def all_job_ids(service: dict[str, str]) -> list[str]:
    r = httpx.get(f"{service['url']}/v1/jobs", headers=headers(service))
    return [j["id"] for j in r.json()["jobs"]]


def assert_no_job_data(page: Any, ids: list[str]) -> None:
    html = page.content()
    assert ids and not [i for i in ids if i in html]
    assert page.locator("#jobs, #job").count() == 0
    assert all(status == 401 for _, _, status in page.api), page.api


def wait_terminal(service: dict[str, str], job_id: str, timeout: float = 600.0) -> dict[str, Any]:
    """The job once it is final (over the API); fails early, with the log's tail, if the dispatcher died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{service['url']}/v1/jobs/{job_id}", headers=headers(service)).json()
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        if not httpx.get(f"{service['url']}/healthz").json()["dispatcher"]:
            log = Path(service["log"]).read_text(errors="replace")[-3000:]
            pytest.fail(f"the service's dispatcher is not running; {service['log']} ends:\n{log}")
        time.sleep(1.0)
    pytest.fail(f"job {job_id} not final after {timeout:.0f} s; see {service['log']}")


def resolved(spec: dict[str, Any], node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A property's schema as the form reads it: `$ref` (siblings win), `allOf: [X]`, `anyOf: [X, null]` taken
    off; and whether null is allowed."""
    nullable = False
    while True:
        node = dict(node)
        alts = [a for a in node.get("anyOf", []) if a.get("type") != "null"]
        if "$ref" in node:
            target: Any = spec
            for key in node.pop("$ref").split("/")[1:]:
                target = target[key]
            node = {**target, **node}
        elif len(node.get("allOf", [])) == 1:
            node = {**node.pop("allOf")[0], **node}
        elif "anyOf" in node and len(alts) == 1:
            nullable = nullable or len(alts) < len(node.pop("anyOf"))
            node = {**alts[0], **node}
        else:
            return node, nullable


def schema_fields(spec: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> dict[str, tuple[dict, bool]]:
    """Every field the form should have, by dotted name: the leaves of the JobCreate schema, recursively, minus
    constants (config.version); an optional object (evaluate) is a field itself (its checkbox) and has fields."""
    out: dict[str, tuple[dict, bool]] = {}
    for name, raw in schema["properties"].items():
        sub, nullable = resolved(spec, raw)
        if "const" in sub:
            continue
        if "properties" not in sub or nullable:
            out[prefix + name] = (sub, nullable)
        if "properties" in sub:
            out.update(schema_fields(spec, sub, f"{prefix}{name}."))
    return out


def open_form(page: Any, service: dict[str, str]) -> None:
    sign_in(page, service)
    page.wait_for_selector("#jobs")
    page.click("a.button[href='#/new']")
    page.wait_for_selector("#submit")


def open_ablations(page: Any) -> None:
    page.click("details[data-field='config.ablations'] > summary")


def test_without_a_key_the_page_shows_no_data(page: Any, service: dict[str, str], other_job: str) -> None:
    ids = all_job_ids(service)
    assert other_job in ids
    page.goto(f"{service['url']}/")  # / redirects to the dashboard
    assert page.url.endswith("/ui/")
    page.wait_for_selector("#signin")
    page.goto(f"{service['url']}/ui/#/jobs/{other_job}")  # a deep link without a key: still only the sign-in
    page.wait_for_selector("#signin")
    page.wait_for_load_state("networkidle")
    assert page.is_hidden("#nav")
    assert_no_job_data(page, ids)
    assert page.api == []  # without a key the page calls no API at all

    page.fill("#key", "pbs2p_not-a-key")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin-error .alert")
    assert "not valid" in page.inner_text("#signin-error")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.api and all(status == 401 for _, _, status in page.api)
    assert_no_job_data(page, ids)


def test_the_key_stays_in_the_tab_and_sign_out_clears_it(page: Any, service: dict[str, str], other_job: str) -> None:
    sign_in(page, service)
    page.wait_for_selector(f'#jobs tr[data-job="{other_job}"]')
    assert page.evaluate("sessionStorage.getItem('pbs2p.key')") == service["key"]
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    page.click("#signout")
    page.wait_for_selector("#signin")
    assert "Signed out" in page.inner_text("#signin")
    assert page.evaluate("sessionStorage.length") == 0
    assert other_job not in page.content()
    page.reload()
    page.wait_for_selector("#signin")
    assert other_job not in page.content()


def test_the_form_has_one_input_per_schema_field(page: Any, service: dict[str, str]) -> None:
    """The form is generated from /openapi.json: exactly one input per JobCreate field (recursively, without
    config.version), of the schema's kind, bounds and pattern, starting at the schema's default."""
    spec = httpx.get(f"{service['url']}/openapi.json").json()
    want = schema_fields(spec, spec["components"]["schemas"]["JobCreate"])
    config = {f"config.{k}" for k in CompressionConfig.model_fields if k not in ("version", "ablations")}
    config |= {f"config.ablations.{k}" for k in Ablations.model_fields}
    assert {k for k in want if k.startswith("config.")} == config  # the schema is the config's
    optional = {k for k, (_, null) in want.items() if null}  # each with an empty "default" choice
    assert optional == {
        "name",
        "revision",
        "webhook_url",
        "config.spbo_steps",
        "config.block_tune_steps",
        "config.ablations.salient_allocation",
        "evaluate",
        "evaluate.windows",
        "evaluate.tasks_limit",
    }

    open_form(page, service)
    got = page.eval_on_selector_all(
        "#submit [name]",
        """els => els.map(e => ({name: e.name, tag: e.tagName, type: e.type, value: e.value, checked: e.checked,
            min: e.getAttribute("min"), max: e.getAttribute("max"), pattern: e.getAttribute("pattern"),
            options: e.tagName === "SELECT" ? [...e.options].map(o => o.value) : null}))""",
    )
    names = [g["name"] for g in got]
    assert len(names) == len(set(names)), names  # one input per field
    assert set(names) == set(want)
    assert "config.version" not in names
    for g in got:
        s, nullable = want[g["name"]]
        default = s.get("default")
        where = f"{g['name']}: {g}"
        if "properties" in s:  # an optional object: a checkbox, off (the schema's default is none)
            assert g["type"] == "checkbox" and not g["checked"], where
        elif "enum" in s:
            assert g["tag"] == "SELECT" and g["options"] == [""] * nullable + s["enum"], where
            assert g["value"] == ("" if default is None else default), where
        elif s["type"] == "boolean":
            assert g["type"] == "checkbox" and g["checked"] == default, where
        elif s["type"] in ("integer", "number"):
            assert g["type"] == "number", where
            lo, hi = s.get("minimum", s.get("exclusiveMinimum")), s.get("maximum", s.get("exclusiveMaximum"))
            assert (float(g["min"]), float(g["max"])) == (lo, hi), where
            assert (g["value"] == "") if default is None else (float(g["value"]) == default), where
        elif s["type"] == "array":  # comma-separated
            assert g["type"] == "text" and g["value"] == ", ".join(map(str, default)), where
        else:
            assert s["type"] == "string" and g["type"] == "text", where
            assert g["pattern"] == s.get("pattern") and g["value"] == (default or ""), where
        if s.get("description") and "properties" not in s:
            assert page.text_content(f'.field[data-field="{g["name"]}"] .help') == s["description"]
    # the ablations collapsed, evaluate off (its fields disabled until checked)
    ablations = page.locator("details[data-field='config.ablations']")
    assert ablations.get_attribute("open") is None
    assert page.inner_text("details[data-field='config.ablations'] > summary") == "Ablations and diagnostics"
    assert page.is_disabled("[name='evaluate.data']")
    page.check("[name=evaluate]")
    assert page.is_enabled("[name='evaluate.data']")
    open_ablations(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-form.png"), full_page=True)


def test_the_form_shows_the_validation_problem(page: Any, service: dict[str, str], files: dict[str, Path]) -> None:
    open_form(page, service)
    page.fill("[name=model]", str(files["model"]))
    page.fill("[name='config.pattern']", "9:8")
    page.click("#submit button[type=submit]")
    page.wait_for_selector("#form-error .alert")
    assert "9:8" in page.inner_text("#form-error")
    beside = page.inner_text('.field[data-field="config.pattern"] .ferror')
    assert "N < M" in beside
    assert ("POST", f"{service['url']}/v1/jobs", 422) in page.api
    assert page.url.endswith("#/new")  # still on the form, the values kept
    assert page.input_value("[name=model]") == str(files["model"])
    assert page.input_value("[name='config.pattern']") == "9:8"


def test_each_server_error_appears_at_its_field(page: Any, service: dict[str, str], files: dict[str, Path]) -> None:
    """422s: each error beside the field its path names (the longest prefix that is a field:
    config.skip_modules.1 -> config.skip_modules), an ablation's in the ablations, opened to show it."""
    open_form(page, service)
    page.fill("[name=model]", str(files["model"]))
    page.fill("[name='config.skip_modules']", "lm_head, " + "x" * 300)  # the second one too long
    page.click("#submit button[type=submit]")
    page.wait_for_selector('.field[data-field="config.skip_modules"].invalid')
    assert "256" in page.inner_text('.field[data-field="config.skip_modules"] .ferror')
    assert "config.skip_modules.1" in page.inner_text("#form-error")

    # once the fields are valid, the checks across fields: two errors, each at the field to change
    page.fill("[name='config.skip_modules']", "lm_head")
    page.fill("[name='config.spbo_steps']", "5")  # more than M - N = 2 for the default 6:8
    open_ablations(page)
    page.select_option("[name='config.ablations.arb_variant']", "arb-rc")  # with the default salient_columns 16
    page.click("details[data-field='config.ablations'] > summary")  # closed again: the error opens it
    page.click("#submit button[type=submit]")
    page.wait_for_selector('.field[data-field="config.spbo_steps"].invalid')
    assert [s for m, u, s in page.api if m == "POST"] == [422, 422]
    assert "M - N = 2" in page.inner_text('.field[data-field="config.spbo_steps"] .ferror')
    assert "salient_columns=0" in page.inner_text('.field[data-field="config.ablations.arb_variant"] .ferror')
    assert page.get_attribute("details[data-field='config.ablations']", "open") is not None
    assert page.locator(".field.invalid").count() == 2  # the first answer's error is gone
    assert page.inner_text('.field[data-field="config.skip_modules"] .ferror') == ""
    detail = page.inner_text("#form-error")
    assert "config.spbo_steps" in detail and "config.ablations.arb_variant" in detail
    assert page.input_value("[name='config.ablations.arb_variant']") == "arb-rc"  # the input kept
    assert page.input_value("[name='config.spbo_steps']") == "5"


def test_a_value_the_form_cannot_parse_is_refused_before_any_request(
    page: Any, service: dict[str, str], files: dict[str, Path]
) -> None:
    open_form(page, service)
    page.fill("[name=model]", str(files["model"]))
    open_ablations(page)
    page.fill("[name='config.ablations.salient_search']", "8, abc")
    page.fill("[name='config.seed']", "1.5")
    sent = len(page.api)
    page.click("#submit button[type=submit]")
    page.wait_for_selector('.field[data-field="config.ablations.salient_search"].invalid')
    assert "'abc' is not an integer" in page.inner_text('.field[data-field="config.ablations.salient_search"] .ferror')
    assert "'1.5' is not an integer" in page.inner_text('.field[data-field="config.seed"] .ferror')
    assert "config.ablations.salient_search" in page.inner_text("#form-error")
    assert len(page.api) == sent  # no request
    assert page.input_value("[name='config.ablations.salient_search']") == "8, abc"


def test_submit_follow_and_report(page: Any, service: dict[str, str], files: dict[str, Path]) -> None:
    t0 = time.perf_counter()
    spbo = "spbo_report" in Ablations.model_fields  # "error before SPBO" exists once the config has the field
    open_form(page, service)
    page.fill("[name=model]", str(files["model"]))
    page.fill("[name=name]", "dashboard-e2e")
    page.fill("[name='config.pattern']", "6:8")
    page.fill("[name='config.calib']", str(files["calib"]))
    page.fill("[name='config.calib_samples']", "4")
    page.fill("[name='config.seqlen']", "32")
    page.fill("[name='config.block_size']", "32")
    page.fill("[name='config.salient_columns']", "2")
    if spbo:
        open_ablations(page)
        page.check("[name='config.ablations.spbo_report']")
    page.check("[name=evaluate]")
    page.fill("[name='evaluate.data']", str(files["calib"]))
    page.fill("[name='evaluate.windows']", "2")
    page.fill("[name='evaluate.seqlen']", "32")
    page.click("#submit button[type=submit]")

    # back on the jobs page: the new row follows the event stream; record every text it shows
    row = page.locator("#jobs tr[data-job]", has_text="dashboard-e2e")
    row.wait_for()
    job_id = row.get_attribute("data-job")
    page.evaluate(
        """(id) => { window.seen = [];
        const tr = document.querySelector(`tr[data-job="${id}"]`);
        const text = () => `${tr.querySelector(".badge").textContent} ${tr.querySelector(".ptext").textContent}`;
        new MutationObserver(() => window.seen.push(text())).observe(tr, {childList: true, subtree: true}); }""",
        job_id,
    )
    job = wait_terminal(service, job_id)
    assert job["state"] == "SUCCEEDED", job["error"]
    page.wait_for_selector(f'tr[data-job="{job_id}"] .badge[data-state="SUCCEEDED"]')  # the page follows
    seen: list[str] = page.evaluate("window.seen")
    assert any("RUNNING" in t for t in seen), seen  # live: QUEUED/RUNNING -> SUCCEEDED without a reload
    assert any(stage in t for t in seen for stage in ("prepare", "capture", "coarse", "compress", "evaluate"))
    assert [u for m, u, s in page.api if "/v1/events" in u]  # the list follows the tenant's one stream
    assert not [u for m, u, s in page.api if u.endswith(f"/{job_id}/events")]
    assert len([u for m, u, s in page.api if m == "GET" and ("/v1/jobs?" in u or u.endswith("/v1/jobs"))]) <= 3
    print(f"\nprogress seen in the page: {list(dict.fromkeys(seen))}")

    # the report
    page.click(f'tr[data-job="{job_id}"] a[href="#/jobs/{job_id}"]')
    page.wait_for_selector("#nchart")
    blocks = job["report"]["blocks"]
    assert len(blocks) == LAYERS
    bars = page.locator("#nchart rect.bar")
    assert bars.count() == LAYERS
    for i, b in enumerate(blocks):
        assert f"N = {b['n_keep']} of 8" in (bars.nth(i).text_content() or "")
    linears = [lr for b in blocks for lr in b["linears"]]
    rows = page.locator("#layers tbody tr")
    assert rows.count() == len(linears) == LAYERS * 7
    before = page.locator("#layers tbody tr td:nth-child(5)").all_inner_texts()
    if spbo and all(lr.get("rel_error_oneshot") is not None for lr in linears):
        assert not [t for t in before if "n/a" in t]
    else:
        assert all("n/a" in t for t in before)
    m = job["metrics"]
    assert page.inner_text("#ppl-before .value") == f"{m['ppl_before']:.2f}"
    assert page.inner_text("#ppl-after .value") == f"{m['ppl_after']:.2f}"
    assert page.inner_text("#true-bits .value") == f"{m['true_bits']:.3f}"
    assert page.inner_text("#paper-bits .value") == f"{m['paper_bits']:.3f}"
    assert "compress" in page.inner_text("#timings")
    hint = page.locator("#job p.muted", has_text="Before SPBO")  # shown where the job did not report it
    assert hint.count() == (0 if spbo else 1)
    listed = page.locator("#config dt").all_text_contents()  # the config, nested fields by their dotted names
    assert "ablations.spbo_report" in listed and "evaluate.windows" in listed and "ablations" not in listed

    # the artifact: the listing with sha256s, one file downloaded through the page (a blob, with the key)
    page.click("#job button:has-text('Files')")
    page.wait_for_selector("table.files tbody tr")
    listing = httpx.get(f"{service['url']}/v1/jobs/{job_id}/artifact", headers=headers(service)).json()["files"]
    assert page.locator("table.files tbody tr").count() == len(listing)
    want = next(f for f in listing if f["name"] == "config.json")
    with page.expect_download() as dl:
        page.click('table.files tr[data-file="config.json"] button')
    got = Path(dl.value.path()).read_bytes()
    assert dl.value.suggested_filename == "config.json"
    assert hashlib.sha256(got).hexdigest() == want["sha256"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot} (job {job_id} in {time.perf_counter() - t0:.0f} s)")


def test_the_form_sends_only_the_changed_fields(page: Any, service: dict[str, str], files: dict[str, Path]) -> None:
    """A few values changed (one of them an ablation): the body holds just those, and the job's config has them
    and the server's defaults everywhere else."""
    open_form(page, service)
    page.fill("[name=model]", str(files["model"]))
    page.fill("[name='config.pattern']", "5:8")
    page.fill("[name='config.seed']", "3")
    page.fill("[name='config.calib_samples']", "64")  # typed, but the default: not sent
    open_ablations(page)
    page.check("[name='config.ablations.spbo_report']")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/v1/jobs")) as answer:
        page.click("#submit button[type=submit]")
    changed = {"pattern": "5:8", "seed": 3, "ablations": {"spbo_report": True}}
    assert answer.value.request.post_data_json == {"model": str(files["model"]), "config": changed}
    assert answer.value.status == 201, answer.value.text()
    job_id = answer.value.json()["id"]
    page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]')  # back on the list
    httpx.post(f"{service['url']}/v1/jobs/{job_id}/cancel", headers=headers(service))  # not needed to run

    job = httpx.get(f"{service['url']}/v1/jobs/{job_id}", headers=headers(service)).json()
    defaults = CompressionConfig().to_dict()
    assert job["config"] == CompressionConfig.from_dict(changed).to_dict()
    assert {k: v for k, v in job["config"].items() if k not in changed} == {
        k: v for k, v in defaults.items() if k not in changed
    }
    assert {k: v for k, v in job["config"]["ablations"].items() if k != "spbo_report"} == {
        k: v for k, v in defaults["ablations"].items() if k != "spbo_report"
    }
    assert job["evaluate"] is None and job["name"] is None


def test_a_failed_job_shows_its_error(page: Any, service: dict[str, str]) -> None:
    """The job page of a FAILED job (the API's answer stubbed in the browser): the error, the config, no report."""
    job_id = "job_failed_in_the_browser"
    base = f"/v1/jobs/{job_id}"
    job = {
        "id": job_id,
        "name": None,
        "state": "FAILED",
        "model": "smollm2-135m",
        "config": {"method": "pbs2p", "pattern": "6:8", "calib": "wiki", "ablations": {"spbo_mode": "fixed"}},
        "evaluate": None,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:01:00Z",
        "started_at": "2026-01-01T00:00:01Z",
        "finished_at": "2026-01-01T00:01:00Z",
        "attempts": 1,
        "progress": {"stage": "compress", "block": 3, "blocks": 30, "percent": 10.0, "eta_seconds": 80.0},
        "metrics": {},
        "timings": {},
        "report": {},
        "error": "Pbs2pError: <b>calibration</b> text has too few tokens",
        "links": {"self": base, "events": f"{base}/events", "artifact": f"{base}/artifact"},
    }
    page.route(f"**{base}", lambda route: route.fulfill(json=job))
    sign_in(page, service)
    page.wait_for_selector("#jobs")
    page.goto(f"{service['url']}/ui/#/jobs/{job_id}")
    page.wait_for_selector("#job-error")
    assert "<b>calibration</b> text has too few tokens" in page.inner_text("#job-error")  # as text, not HTML
    assert page.locator("#job-error b").count() == 0
    assert page.locator("#nchart, #layers").count() == 0
    assert page.inner_text("#ppl-after .value") == "n/a"
    text = page.inner_text("#job .ptext")
    assert "block 3 of 30" in text and "ETA" not in text  # where it stopped; no ETA for a final job
    assert page.locator("#config dt", has_text="pattern").count() == 1
    names, values = page.locator("#config dt").all_text_contents(), page.locator("#config dd").all_text_contents()
    listed = list(zip(names, values, strict=True))
    assert ("ablations.spbo_mode", "fixed") in listed  # the ablations nested, by their dotted names
    # nothing to follow for this (final) job; the list page may still follow other tests' running jobs
    assert not [u for _, u, _ in page.api if u.endswith(f"{base}/events")]


def test_a_job_with_tasks_shows_their_accuracy_before_and_after(page: Any, service: dict[str, str]) -> None:
    """The job page of a SUCCEEDED job with evaluate.tasks (the API's answer stubbed in the browser): one row per
    task and metric with the accuracy before and after, its change and standard error; the tasks in the config."""
    job_id = "job_with_tasks_in_the_browser"
    base = f"/v1/jobs/{job_id}"
    before = {"arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.45, "acc_norm_stderr": 0.1, "examples": 20},
              "boolq": {"acc": 0.6, "acc_stderr": 0.11, "examples": 20}}  # fmt: skip
    after = {"arc_easy": {"acc": 0.4, "acc_stderr": 0.11, "acc_norm": 0.35, "acc_norm_stderr": 0.1, "examples": 20},
             "boolq": {"acc": 0.55, "acc_stderr": 0.11, "examples": 20}}  # fmt: skip
    tasks = {"before": before, "after": after, "data": {}, "lm_eval": "0.4.13", "data_package": None, "limit": 20}
    job = {
        "id": job_id, "name": None, "state": "SUCCEEDED", "model": "smollm2-135m",
        "config": {"method": "pbs2p", "pattern": "6:8", "calib": "wiki", "ablations": {}},
        "evaluate": {"data": "wiki", "seqlen": 512, "windows": 40, "tasks": ["arc_easy", "boolq"], "tasks_limit": 20},
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:01:00Z",
        "started_at": "2026-01-01T00:00:01Z", "finished_at": "2026-01-01T00:01:00Z", "attempts": 1,
        "progress": {"stage": "done", "percent": 100.0},
        "metrics": {"ppl_before": 20.0, "ppl_after": 40.0, "tasks": tasks},
        "timings": {}, "report": {}, "error": None,
        "links": {"self": base, "events": f"{base}/events", "artifact": f"{base}/artifact"},
    }  # fmt: skip
    page.route(f"**{base}", lambda route: route.fulfill(json=job))
    sign_in(page, service)
    page.wait_for_selector("#jobs")
    page.goto(f"{service['url']}/ui/#/jobs/{job_id}")
    page.wait_for_selector("#tasks")
    rows = page.eval_on_selector_all(
        "#tasks tr.task", "rs => rs.map(r => [...r.querySelectorAll('td')].map(td => td.textContent))"
    )
    assert rows == [
        ["arc_easy", "acc", "0.5000", "0.4000", "-0.1000", "0.1100", "20"],
        ["arc_easy", "acc_norm", "0.4500", "0.3500", "-0.1000", "0.1000", "20"],
        ["boolq", "acc", "0.6000", "0.5500", "-0.0500", "0.1100", "20"],
    ]
    assert "first 20 examples each" in page.inner_text("#tasks >> xpath=../..")
    names, values = page.locator("#config dt").all_text_contents(), page.locator("#config dd").all_text_contents()
    assert ("evaluate.tasks", '["arc_easy","boolq"]') in list(zip(names, values, strict=True))


def test_a_downloading_job_shows_bytes_and_eta(page: Any, service: dict[str, str]) -> None:
    """A RUNNING job fetching its model from a hub (the API's answer stubbed in the browser): bytes and an ETA."""
    job_id = "job_downloading_in_the_browser"
    base = f"/v1/jobs/{job_id}"
    progress = {"stage": "downloading", "bytes_done": 120_000_000, "bytes_total": 538_000_000, "percent": 22.3}
    job = {
        "id": job_id, "name": None, "state": "RUNNING", "model": "HuggingFaceTB/SmolLM2-135M@main",
        "config": {"method": "pbs2p", "pattern": "6:8", "calib": "wiki", "ablations": {}}, "evaluate": None,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:01:00Z",
        "started_at": "2026-01-01T00:00:01Z", "finished_at": None, "attempts": 1,
        "progress": {**progress, "eta_seconds": 95.0}, "metrics": {}, "timings": {}, "report": {}, "error": None,
        "links": {"self": base, "events": f"{base}/events", "artifact": f"{base}/artifact"},
    }  # fmt: skip
    page.route(f"**{base}", lambda route: route.fulfill(json=job))
    page.route(f"**{base}/events", lambda route: route.fulfill(status=200, body="", content_type="text/event-stream"))
    sign_in(page, service)
    page.wait_for_selector("#jobs")
    page.goto(f"{service['url']}/ui/#/jobs/{job_id}")
    page.wait_for_selector("#job .ptext")
    text = page.inner_text("#job .ptext")
    assert text == "downloading · 114.4 MiB of 513.1 MiB · ETA 2 min", text


def test_twenty_running_jobs_follow_one_stream(page: Any, service: dict[str, str]) -> None:
    """20 running jobs on the list page: one event stream for them all (not one per row: a browser allows ~6
    connections per host), and every row shows its own progress as it changes."""
    store = JobStore(Settings(data_dir=Path(service["log"]).parent).db_url)
    owner = "browser-test"  # no dispatcher's: these rows are moved by the test alone
    now = time.time()
    ids = [f"job_browser{i:02d}{'0' * 13}" for i in range(20)]
    try:
        with store.session() as s:  # RUNNING from the start: the service's dispatcher never sees them queued
            for i, job_id in enumerate(ids):
                s.add(JobRow(id=job_id, tenant="tenant", name=f"many-{i:02d}", state="RUNNING", model="smollm2-135m",
                             config='{"method":"pbs2p","pattern":"6:8"}', created_at=now + i, updated_at=now,
                             started_at=now, attempts=1, owner=owner, priority=0))  # fmt: skip
        sign_in(page, service)
        for job_id in ids:
            page.wait_for_selector(f'tr[data-job="{job_id}"] .badge[data-state="RUNNING"]')
        for i, job_id in enumerate(ids):
            progress = {"stage": "compress", "block": i + 1, "blocks": 30, "percent": round(100 * (i + 1) / 30, 1)}
            assert store.set_progress(job_id, owner, progress) == JobState.RUNNING
        for i, job_id in enumerate(ids):
            cell = page.locator(f'tr[data-job="{job_id}"] .ptext')
            cell.filter(has_text=f"block {i + 1} of 30").wait_for()
        for job_id in ids[:10]:
            assert store.transition(job_id, [JobState.RUNNING], JobState.CANCELLED, owner=owner)
        for job_id in ids[:10]:
            page.wait_for_selector(f'tr[data-job="{job_id}"] .badge[data-state="CANCELLED"]')
        streams = [u for m, u, s in page.api if "/events" in u]
        assert len(streams) == 1 and streams[0].endswith("/v1/events"), streams
    finally:
        for job_id in ids:
            store.transition(job_id, [JobState.RUNNING], JobState.CANCELLED, owner=owner)
        store.close()


@pytest.fixture(scope="module")
def finished(
    service: dict[str, str], files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> list[Finished]:
    """Three finished jobs of the tenant, compressed and evaluated for real in this process (about a second each)
    and stored SUCCEEDED with their summaries: other patterns, a CFS allocation, another method."""
    store = JobStore(Settings(data_dir=Path(service["log"]).parent).db_url)
    out = tmp_path_factory.mktemp("finished")
    runs: list[tuple[str, dict[str, Any]]] = [
        ("cmp-a", {"pattern": "4:8"}),
        ("cmp-b", {"pattern": "5:8", "allocation": "cfs"}),
        ("cmp-c", {"pattern": "6:8", "method": "prune-binarize"}),
    ]
    try:
        return [add_finished_job(store, "tenant", n, files["model"], files["calib"], out / n, **o) for n, o in runs]
    finally:
        store.close()


def test_compare_selected_jobs(page: Any, service: dict[str, str], finished: list[Finished], other_job: str) -> None:
    """Three finished jobs ticked on the list: one point per job on perplexity against true bits, each where its
    numbers put it, labelled by name, method and N:M; per block each job's N, per linear its error."""
    sign_in(page, service)
    for f in finished:
        page.wait_for_selector(f'tr[data-job="{f.id}"] td.pick input[type=checkbox]')
    page.wait_for_selector(f'tr[data-job="{other_job}"]')
    assert page.locator(f'tr[data-job="{other_job}"] td.pick input').count() == 0  # CANCELLED: no report
    compare = page.locator("#compare-selected")
    page.check(f'tr[data-job="{finished[0].id}"] td.pick input')
    assert compare.is_disabled()  # one job is no comparison
    for f in finished[1:]:
        page.check(f'tr[data-job="{f.id}"] td.pick input')
    assert compare.is_enabled() and compare.inner_text() == "Compare 3 jobs"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-select.png"))
    compare.click()
    page.wait_for_selector("#compare-plot")
    assert page.url.endswith("#/compare/" + ",".join(f.id for f in finished))
    reports = sorted(u for m, u, s in page.api if u.endswith("/report"))  # fetched at once: in any order
    assert reports == sorted(f"{service['url']}/v1/jobs/{f.id}/report" for f in finished)

    # the plot: one point per job, x affine in true bits, y in perplexity after (or its log, on a log axis)
    points = page.eval_on_selector_all(
        "#compare-plot g.point",
        """els => els.map(g => ({job: g.dataset.job, label: g.querySelector("text").textContent,
            cx: +g.querySelector("circle").getAttribute("cx"), cy: +g.querySelector("circle").getAttribute("cy")}))""",
    )
    assert sorted(p["job"] for p in points) == sorted(f.id for f in finished)
    by_id = {f.id: f for f in finished}
    metric = {p["job"]: by_id[p["job"]].summary["metrics"] for p in points}
    labels = {f.id: f"{f.name} · {m} · {pat}" for f, m, pat in zip(finished, ("pbs2p", "pbs2p", "prune-binarize"),
                                                                      ("4:8", "5:8", "6:8"), strict=True)}  # fmt: skip
    assert {p["job"]: p["label"] for p in points} == labels
    log_y = page.get_attribute("#compare-plot", "data-yscale") == "log"
    for axis, key, scale in (("cx", "true_bits", 1.0), ("cy", "ppl_after", -1.0)):
        values = {j: math.log10(m[key]) if key == "ppl_after" and log_y else m[key] for j, m in metric.items()}
        assert len(set(values.values())) == len(values), values  # distinct: the order and the scale are tested
        (a, pa), (b, pb) = [(values[p["job"]], p[axis]) for p in points[:2]]
        slope = (pb - pa) / (b - a)
        assert slope * scale > 0  # more bits to the right, more perplexity higher up
        for p in points:
            assert p[axis] == pytest.approx(pa + slope * (values[p["job"]] - a), abs=0.01)

    # the table: one column group per job (its label), per block its N, per linear its error
    assert page.locator("#compare-blocks th.group").all_inner_texts() == [labels[f.id] for f in finished]
    assert page.locator("#compare-blocks thead tr:nth-child(2) th").all_text_contents() == ["N", "error"] * 3
    assert page.locator("#compare-blocks tbody tr").count() == LAYERS * 7
    for f in finished:
        blocks = f.summary["blocks"]
        assert len(blocks) == LAYERS
        for b in blocks:
            cell = page.locator(f'#compare-blocks td.n[data-job="{f.id}"][data-block="{b["index"]}"]')
            assert cell.inner_text() == str(b["n_keep"])
        errors = page.locator(f'#compare-blocks td.err[data-job="{f.id}"]').all_inner_texts()
        assert errors == [f"{lr['rel_error']:.4f}" for b in blocks for lr in b["linears"]]
        row = page.locator(f'#compare-jobs tr[data-job="{f.id}"]').inner_text()
        assert f"{f.summary['metrics']['ppl_after']:.2f}" in row and f"{f.summary['metrics']['true_bits']:.3f}" in row
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)

    # a job without a report (cancelled) among them: its problem shown, the others compared
    page.goto(f"{service['url']}/ui/#/compare/{finished[0].id},{other_job}")
    page.wait_for_selector(f'#compare .alert[data-job="{other_job}"]')
    assert "CANCELLED" in page.inner_text(f'#compare .alert[data-job="{other_job}"]')
    assert page.locator("#compare-plot g.point").count() == 1


def test_a_job_without_perplexity_is_listed_not_plotted(
    page: Any, service: dict[str, str], files: dict[str, Path], finished: list[Finished], tmp_path: Path
) -> None:
    """A finished job submitted without `evaluate` has no perplexity: no point, named below the plot, its N and
    errors in the table all the same."""
    store = JobStore(Settings(data_dir=Path(service["log"]).parent).db_url)
    try:
        bare = add_finished_job(store, "tenant", "cmp-bare", files["model"], files["calib"], tmp_path / "a", False)
    finally:
        store.close()
    assert "ppl_after" not in bare.summary["metrics"]
    sign_in(page, service)
    page.wait_for_selector("#jobs")
    page.goto(f"{service['url']}/ui/#/compare/{finished[0].id},{bare.id}")
    page.wait_for_selector("#compare-blocks")
    assert [g.get_attribute("data-job") for g in page.locator("#compare-plot g.point").all()] == [finished[0].id]
    assert "cmp-bare · pbs2p · 6:8" in page.inner_text("#unplotted")
    for b in bare.summary["blocks"]:
        cell = page.locator(f'#compare-blocks td.n[data-job="{bare.id}"][data-block="{b["index"]}"]')
        assert cell.inner_text() == str(b["n_keep"])
    assert page.inner_text(f'#compare-jobs tr[data-job="{bare.id}"]').count("n/a") == 2  # perplexity before, after
