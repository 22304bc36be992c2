"""The job spec: loading, templates, environment references, overrides and error messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from ferry.backends.errors import ConfigurationError
from ferry.flows.settings import FerrySettingWarning, TemplateSettings
from ferry.flows.spec import load_job

BASE = """
source: {backend: memory, dataset: orders, generate: {rows: 10}}
target: {backend: local, url: ./out, dataset: orders}
"""


def _job(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_name_from_file(tmp_path):
    job = load_job(_job(tmp_path, BASE, "nightly archive.yaml"))
    assert job.name == "nightly-archive"
    assert job.mode.value == "append"
    assert job.stream.batch_size == 65536 and job.stream.batch_max_bytes == 64 * 1024 * 1024
    assert job.on_error == "fail" and job.schema_policy == "strict"


@pytest.mark.parametrize("template", ["high-performance", "memory-optimized"])
def test_bundled_templates_load_and_set_stream(tmp_path, template):
    job = load_job(_job(tmp_path, f"extends: {template}\n" + BASE))
    data = TemplateSettings.model_validate(
        __import__("yaml").safe_load((Path(__file__).parents[2] / "configs" / f"{template}.yaml").read_text())
    )
    assert job.stream == data.stream
    assert job.databases.postgres.pool.max_connections == data.databases.postgres.pool.max_connections


def test_job_values_win_over_template_and_overrides_win_over_both(tmp_path):
    text = "extends: high-performance\nstream: {parallel: 3}\n" + BASE
    job = load_job(_job(tmp_path, text), overrides=["stream.parallel=5", "mode=replace"])
    assert job.stream.parallel == 5
    assert job.stream.batch_size == 131072  # from the template
    assert job.mode.value == "replace"


def test_template_spellings_are_aliases(tmp_path):
    _job(tmp_path, "databases:\n  postgres:\n    pool: {min_connections: 2, max_size: 4, timeout: 3}\n", "t.yaml")
    job = load_job(_job(tmp_path, "extends: t.yaml\n" + BASE))
    pool = job.databases.postgres.pool
    assert (pool.min_connections, pool.max_connections, pool.connection_timeout) == (2, 4, 3)


def test_pool_bounds_are_refused_with_the_reason(tmp_path):
    _job(tmp_path, "databases:\n  postgres:\n    pool: {min_size: 9, max_size: 4}\n", "t.yaml")
    with pytest.raises(ConfigurationError, match=r"min_connections \(9\) is above max_connections \(4\)"):
        load_job(_job(tmp_path, "extends: t.yaml\n" + BASE))


def test_a_key_without_effect_warns_with_the_reason(tmp_path):
    _job(tmp_path, "databases:\n  s3:\n    transfer: {max_io_queue: 100}\n", "t.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_job(_job(tmp_path, "extends: t.yaml\n" + BASE))
    messages = [str(w.message) for w in caught if issubclass(w.category, FerrySettingWarning)]
    assert messages and "max_io_queue has no effect" in messages[0]


def test_environment_references(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_TEST_OUT", str(tmp_path / "elsewhere"))
    text = BASE.replace("url: ./out", 'url: "${FERRY_TEST_OUT}"').replace("dataset: orders}", 'dataset: "${FERRY_DS:-orders}"}')
    job = load_job(_job(tmp_path, text))
    assert job.target.settings["url"] == str(tmp_path / "elsewhere")
    assert job.target.dataset == "orders"
    monkeypatch.delenv("FERRY_TEST_OUT")
    with pytest.raises(ConfigurationError, match="environment variable FERRY_TEST_OUT is not set") as info:
        load_job(_job(tmp_path, text))
    assert info.value.path == "target.url"


@pytest.mark.parametrize(
    ("text", "path_and_message"),
    [
        (BASE + "mode: merge\n", "mode: Input should be 'append', 'replace' or 'upsert'"),
        (BASE + "on_error: skip\n", "on_error"),
        (BASE + "mode: upsert\n", "needs `key: [column, ...]`"),
        (BASE.replace("generate: {rows: 10}", "generate: {rows: 10, speed: 2}"), "source.generate.speed: unknown key"),
        (BASE + "extends: nowhere\n", "template 'nowhere' not found"),
        (BASE.replace("backend: local", "block: just-a-name"), "must look like `<block-type-slug>/<name>`"),
        (BASE + "stream: {batch_size: 0}\n", "stream.batch_size: Input should be greater than or equal to 1"),
        (BASE.replace("target: {", "target: {where: {a: 1}, "), "`where` belongs to the source"),
        (BASE + "source_extra: 1\n", "source_extra: unknown key; expected one of:"),
    ],
)
def test_errors_name_the_field_and_what_is_expected(tmp_path, text, path_and_message):
    with pytest.raises(ConfigurationError) as info:
        load_job(_job(tmp_path, text))
    assert path_and_message in str(info.value)
    assert str(tmp_path / "job.yaml") in str(info.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ConfigurationError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(ConfigurationError, match="the job file is empty"):
        load_job(_job(tmp_path, ""))
    with pytest.raises(ConfigurationError, match="line 3, column 1: malformed YAML"):
        load_job(_job(tmp_path, "source:\n  - [\n"))


def test_secret_references_stay_unresolved_until_the_backend_is_built(tmp_path, monkeypatch):
    import asyncio

    from ferry.flows.spec import build_backend, literal_secrets

    monkeypatch.setenv("FERRY_TEST_PW", "pw-from-env")
    text = BASE.replace(
        "target: {backend: local, url: ./out, dataset: orders}",
        'target: {backend: postgres, host: 127.0.0.1, dataset: orders, password: "${FERRY_TEST_PW}"}',
    )
    job = load_job(_job(tmp_path, text))
    assert job.target.settings["password"] == "${FERRY_TEST_PW}"
    assert "pw-from-env" not in job.model_dump_json()
    assert literal_secrets(job) == []
    backend = asyncio.run(build_backend(job.target))
    assert backend.password.get_secret_value() == "pw-from-env"
    monkeypatch.delenv("FERRY_TEST_PW")
    with pytest.raises(ConfigurationError, match="FERRY_TEST_PW is not set") as info:
        load_job(_job(tmp_path, text))
    assert info.value.path == "target.password"
