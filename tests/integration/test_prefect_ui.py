"""Ferry in Prefect's web UI, driven in a real browser (Debian's chromium through Playwright).

Against a local `prefect server start` with its UI and a process worker:
the `migrate-job` deployment's run form shows the job's fields with their
descriptions; filled in and submitted, it starts a run that completes and
publishes its artifacts; the Postgres block type shows its shipped logo, and a
saved Postgres block's form keeps the password masked.

Each page is photographed. The pictures go to a temporary folder, or to the
folder named by FERRY_SCREENSHOTS; the user guide's pictures are refreshed with
``FERRY_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/integration/test_prefect_ui.py``.
The browser reaches nothing but the local server: the block logos' public URLs
are answered from the files shipped in the package, everything else is refused.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ferry.backends.logos import RAW_URL, logo_path
from ferry.backends.postgres import PostgresBackend
from ferry.flows.spec import EndpointSpec, JobSpec
from tests.integration.prefect_server import PrefectServer, prefect_server_ui  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SECRET = "ui-Pa55word-never-shown-4b1d"
MASK = "********"
#: The job's fields whose descriptions the run form must show.
JOB_FIELDS = ("source", "target", "mode", "key", "transforms", "stream", "verify")

#: A schema-form property: the group around the label with this exact text.
_PROPERTY = "xpath=.//label[normalize-space()={label!r}]/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' group ')][1]"


def _property(scope, label: str):
    return scope.locator(_PROPERTY.format(label=label))


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, through Playwright (skipped only when chromium is not installed)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (.ci/system-packages does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("FERRY_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def project():
    """The deployed project's folder, where the worker runs flows (a short path reads well in the pictures)."""
    folder = Path(tempfile.mkdtemp(prefix="ferry-ui-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def page(browser, prefect_server_ui: PrefectServer):  # noqa: F811
    """A browser page that can reach the local server and the shipped logos, and nothing else."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    refused: list[str] = []
    logos = f"{RAW_URL}/backends/logos/"

    def route(request_route):
        url = request_route.request.url
        if url.startswith(prefect_server_ui.ui_url + "/"):
            request_route.continue_()
        elif url.startswith(logos):
            request_route.fulfill(path=str(logo_path(url.removeprefix(logos))), content_type="image/png")
        else:
            refused.append(url)  # the UI's own analytics and the like; the test must work offline
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def _save_blocks(server: PrefectServer, project: Path) -> None:
    """The blocks the test uses: generated orders, a folder, and a Postgres database with a password."""
    (project / "save_blocks.py").write_text(
        "import os\n"
        "from ferry.backends.memory import MemoryBackend\n"
        "from ferry.backends.objectstore import ObjectStoreBackend\n"
        "from ferry.backends.postgres import PostgresBackend\n"
        "MemoryBackend(generate={'rows': 20000}).save('orders-generator', overwrite=True)\n"
        "ObjectStoreBackend(url='lake').save('lake', overwrite=True)\n"  # the worker runs in the project folder
        "PostgresBackend(host='warehouse.internal', database='shop', user='ferry',\n"
        "                password=os.environ['WAREHOUSE_PASSWORD']).save('warehouse', overwrite=True)\n"
    )
    saved = subprocess.run(
        [sys.executable, "save_blocks.py"], cwd=project, env={**server.env, "WAREHOUSE_PASSWORD": SECRET},
        capture_output=True, text=True, timeout=120,
    )
    assert saved.returncode == 0, saved.stderr


def _runs_of(server: PrefectServer, deployment: str) -> set[str]:
    """Ids of the flow runs of a deployment of the `ferry-migrate` flow."""
    with server.api() as api:
        deployment_id = api.get(f"/deployments/name/ferry-migrate/{deployment}").json()["id"]
        runs = api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}).json()
    return {run["id"] for run in runs}


def _submit_run_form(page, server: PrefectServer, deployment: str, attempts: int = 3) -> str:
    """Press the run form's Submit; returns the id of the flow run it created.

    On a loaded machine the server has answered the form's request with an
    error now and then (the UI then says "Unknown error while creating flow
    run" and keeps the form): the form is submitted again, up to ``attempts``
    times, and the test fails with the server's answers if none created a run.
    """
    earlier = _runs_of(server, deployment)
    answers: list = []

    def record(response) -> None:
        if "/create_flow_run" in response.url:
            answers.append(response)

    page.on("response", record)
    try:
        for _ in range(attempts):
            seen = len(answers)
            page.get_by_role("button", name="Submit").click()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                new = _runs_of(server, deployment) - earlier
                if new:
                    assert len(new) == 1, new
                    return new.pop()
                if len(answers) > seen and answers[-1].status >= 400:
                    break  # refused: submit again
                page.wait_for_timeout(500)
    finally:
        page.remove_listener("response", record)
    refusals = [f"{answer.status}: {answer.text()[:500]}" for answer in answers]
    pytest.fail(f"the run form created no run of {deployment}; the server answered: {refusals}")


def test_run_a_job_from_the_deployment_form_and_see_blocks_in_the_ui(
    page, prefect_server_ui: PrefectServer, screenshots: Path, project: Path  # noqa: F811
):
    from playwright.sync_api import expect

    server = prefect_server_ui
    server.cli("block", "register", "-m", "ferry.backends")
    server.deploy_project(project)
    _save_blocks(server, project)
    worker = server.start_worker("ferry-process", cwd=project)

    # The migrate-job deployment, its custom run form, and Ferry's job fields with their descriptions.
    page.goto(f"{server.ui_url}/v2/deployments")
    page.get_by_role("link", name="migrate-job", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    main = page.locator("main")
    _property(main, "job").get_by_role("tab", name="JobSpec").click()
    expect(main.get_by_text(JobSpec.__doc__.strip(), exact=True)).to_be_visible()
    for name in JOB_FIELDS:
        expect(main.get_by_text(JobSpec.model_fields[name].description, exact=True).first).to_be_visible()
    expect(main.get_by_text(EndpointSpec.model_fields["block"].description, exact=True).first).to_be_visible()

    _property(main, "Name (Optional)").locator("input, textarea").first.fill("ui-orders")
    source, target = _property(main, "EndpointSpec").nth(0), _property(main, "EndpointSpec").nth(1)
    for side, block in ((source, "ferry-memory/orders-generator"), (target, "ferry-object-store/lake")):
        block_property = _property(side, "Block (Optional)")
        block_property.get_by_role("tab", name="str").click()
        block_property.locator("input, textarea").first.fill(block)
        _property(side, "Dataset").locator("input, textarea").first.fill("orders")
    _property(main, "WriteMode (Optional)").get_by_role("button", name="Select WriteMode").click()
    page.get_by_role("option", name="replace", exact=True).click()
    _property(main, "job").evaluate("element => element.scrollIntoView({block: 'start'})")
    page.screenshot(path=screenshots / "prefect-ui-run-form.png")
    flow_run_id = _submit_run_form(page, server, "migrate-job")

    # The run: the form's values reached the flow as a typed job, and it completed with its artifacts.
    run = server.wait_for_flow_run(flow_run_id)
    server.stop_worker(worker)
    assert run["state_type"] == "COMPLETED", (run["state"], server.worker_output(worker)[-3000:])
    job = run["parameters"]["job"]
    assert (job["name"], job["mode"], job["source"]["block"], job["target"]["block"]) == (
        "ui-orders", "replace", "ferry-memory/orders-generator", "ferry-object-store/lake"
    )
    assert (project / "lake" / "orders" / "_ferry" / "CURRENT").exists()

    page.goto(f"{server.ui_url}/v2/runs/flow-run/{flow_run_id}")
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    page.get_by_role("tab", name="Artifacts").click()
    expect(page.get_by_text("ferry-ui-orders", exact=True)).to_be_visible()
    expect(page.get_by_text("ferry-ui-orders-summary", exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "prefect-ui-flow-run.png")
    page.get_by_text("ferry-ui-orders-summary", exact=True).click()
    expect(page.get_by_text("Rows: 20,000 read, 20,000 written, 0 rejected")).to_be_visible()
    expect(page.get_by_text("Verification: passed", exact=False).first).to_be_visible()
    page.screenshot(path=screenshots / "prefect-ui-artifact.png")

    # The Postgres block type: the shipped logo renders, the docs link and the code example are there.
    page.goto(f"{server.ui_url}/v2/blocks/catalog/ferry-postgres")
    logo = page.locator(f"main img[src='{PostgresBackend._logo_url}']").first
    expect(logo).to_be_visible()
    # decode() settles once the picture is loaded: it fails for a broken image.
    assert logo.evaluate("img => img.decode().then(() => img.naturalWidth)") == 256
    expect(page.get_by_role("link", name="Documentation")).to_have_attribute(
        "href", str(PostgresBackend._documentation_url)
    )
    expect(page.get_by_text('PostgresBackend.load("').first).to_be_visible()
    page.screenshot(path=screenshots / "prefect-ui-block-type.png")

    # The saved Postgres block's form: the password is a masked field holding no trace of the secret.
    with server.api() as api:
        block = api.get("/block_types/slug/ferry-postgres/block_documents/name/warehouse").json()
    page.goto(f"{server.ui_url}/v2/blocks")
    page.get_by_role("link", name="warehouse", exact=True).click()
    page.wait_for_url(re.compile(f".*/blocks/block/{block['id']}.*"))
    page.goto(f"{server.ui_url}/v2/blocks/block/{block['id']}/edit")
    password = _property(page.locator("main"), "Password (Optional)")
    expect(password.get_by_text(PostgresBackend.model_fields["password"].description)).to_be_visible()
    field = password.locator("input").first
    expect(field).to_have_attribute("type", "password")
    expect(field).to_have_value(MASK)  # what the server hands out in place of a secret
    expect(_property(page.locator("main"), "Host (Optional)").locator("input, textarea").first).to_have_value(
        "warehouse.internal"
    )
    assert SECRET not in page.content()
    page.screenshot(path=screenshots / "prefect-ui-postgres-block.png")
    # Revealed, the field shows the server's mask, not the password; saving the form keeps the stored one.
    password.get_by_role("button", name="Show password").click()
    expect(field).to_have_attribute("type", "text")
    expect(field).to_have_value(MASK)
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(f".*/blocks/block/{block['id']}$"))
    with server.api() as api:
        stored = api.get(f"/block_documents/{block['id']}", params={"include_secrets": True}).json()
    assert stored["updated"] != block["updated"], "the form was not saved"
    assert stored["data"]["password"] == SECRET
