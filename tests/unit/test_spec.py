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


# -- what the databases: section gives each endpoint ------------------------------------------


def _built(endpoint):
    import asyncio

    from ferry.flows.spec import build_backend

    return asyncio.run(build_backend(endpoint))


def _load_noting(path: Path, overrides: list[str] | None = None):
    """The job and the FerrySettingWarning messages its loading gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = load_job(path, overrides)
    return job, [str(w.message) for w in caught if issubclass(w.category, FerrySettingWarning)]


PG_SOURCE = "source: {backend: postgres, dataset: orders%s}\ntarget: {backend: memory, dataset: copy}\n"


def test_a_postgres_endpoint_takes_the_template_pool_and_its_own_values_win(tmp_path):
    text = "extends: high-performance\n" + PG_SOURCE % ", host: db.internal, max_size: 60, command_timeout: 5"
    job, notes = _load_noting(_job(tmp_path, text))
    backend = _built(job.source)
    # Tuning from the template, except what the endpoint sets (under any spelling).
    assert (backend.min_connections, backend.max_connections) == (20, 60)
    assert (backend.connection_timeout, backend.command_timeout) == (10, 5)
    assert (backend.max_queries, backend.max_inactive_connection_lifetime) == (100_000, 600)
    # The endpoint names its own server: the template's database is not used on it, and that is said.
    assert (backend.host, backend.database) == ("db.internal", "postgres")
    assert notes == [
        f"{_job(tmp_path, text)}: source: databases.postgres.database ('ferry') is not applied: "
        "the endpoint names its own server (`host`)"
    ]


def test_connection_defaults_apply_only_to_an_endpoint_that_names_no_server(tmp_path):
    job, notes = _load_noting(_job(tmp_path, "extends: high-performance\n" + PG_SOURCE % ", port: 6432"))
    backend = _built(job.source)
    assert (backend.host, backend.port, backend.database) == ("localhost", 6432, "ferry")
    assert notes == []
    text = "extends: high-performance\n" + PG_SOURCE % ", dsn: 'postgresql://app@db.internal:5432/sales'"
    job, notes = _load_noting(_job(tmp_path, text))
    backend = _built(job.source)
    assert backend.connection_uri().startswith("postgresql://app@db.internal:5432/sales")
    assert backend.max_connections == 50
    assert len(notes) == 2 and all("names its own server (`dsn`)" in n for n in notes)


def test_a_template_minimum_above_the_endpoint_maximum_is_not_applied(tmp_path):
    job, notes = _load_noting(_job(tmp_path, "extends: high-performance\n" + PG_SOURCE % ", max_size: 8"))
    backend = _built(job.source)
    assert (backend.min_connections, backend.max_connections) == (1, 8)
    expected = "pool.min_connections (20) is not applied: it is above the endpoint's max_connections (8)"
    assert any(expected in n for n in notes)


def test_a_saved_block_keeps_its_connection_and_takes_the_template_tuning(tmp_path):
    from ferry.backends.postgres import PostgresBackend
    from ferry.flows.spec import _tuned_block

    text = "extends: high-performance\nsource: {block: ferry-postgres/prod, dataset: orders}\n"
    job, notes = _load_noting(_job(tmp_path, text + "target: {backend: memory, dataset: copy}\n"))
    assert len(notes) == 2
    assert all("is not applied: the endpoint names saved block 'ferry-postgres/prod'" in n for n in notes)
    saved = PostgresBackend(host="db.prod", database="sales", password="pw", max_connections=30)
    saved._block_document_name = "prod"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = _tuned_block(saved, job.source)
    assert not [w for w in caught if issubclass(w.category, FerrySettingWarning)]
    assert (tuned.host, tuned.database, tuned.password.get_secret_value()) == ("db.prod", "sales", "pw")
    assert (tuned.min_connections, tuned.max_connections, tuned.connection_timeout) == (20, 50, 10)
    assert tuned.concurrency_tag() == "ferry-prod" and saved.max_connections == 30


def test_the_s3_section_tunes_s3_endpoints_only(tmp_path):
    target = "target: {backend: s3, %s, dataset: orders, transfer: {max_concurrency: 3}}\n"
    source = "source: {backend: memory, dataset: orders}\n"
    job = load_job(_job(tmp_path, "extends: high-performance\n" + source + target % "prefix: lake"))
    backend = _built(job.target)
    assert backend.location_info().root == "ferry-data/lake"  # the template's bucket: no location given
    assert backend.pool.max_connections == 100
    assert backend.transfer.block_size == 8 * 2**20 and backend.transfer.multipart_threshold == 8 * 2**20
    assert backend.transfer.max_concurrency == 3  # the endpoint's own
    job, notes = _load_noting(_job(tmp_path, "extends: high-performance\n" + source + target % "url: 's3://own/x'"))
    assert _built(job.target).location_info().root == "own/x"
    assert notes == [
        f"{tmp_path / 'job.yaml'}: target: databases.s3.bucket ('ferry-data') is not applied: "
        "the endpoint names its own server (`url`)"
    ]
    job = load_job(_job(tmp_path, "extends: high-performance\n" + BASE))
    assert _built(job.target).pool.max_connections is None  # a local folder is not S3
    with pytest.raises(ConfigurationError, match="set `url`"):  # nor does a folder without a url become one
        load_job(_job(tmp_path, "extends: high-performance\n" + BASE.replace("url: ./out, ", "")))


def test_elasticsearch_keys_become_client_and_index_settings(tmp_path):
    _job(
        tmp_path,
        "databases:\n  elasticsearch:\n    timeout: 45\n    refresh: true\n"
        "    pool: {connections: 30, maxsize: 60}\n    index: {number_of_shards: 2, refresh_interval: 5s}\n",
        "t.yaml",
    )
    text = "extends: t.yaml\nsource: {backend: memory, dataset: o}\ntarget: {backend: opensearch, dataset: o}\n"
    job, notes = _load_noting(_job(tmp_path, text))
    backend = _built(job.target)
    assert backend.request_timeout_seconds == 45 and backend.connections_per_node == 60
    assert (backend.number_of_shards, backend.number_of_replicas, backend.refresh_interval) == (2, 1, "5s")
    assert any("refresh: true has no effect" in n for n in notes)
    assert any("pool.connections (30) has no effect" in n and "maxsize (60)" in n for n in notes)
    own, _ = _load_noting(_job(tmp_path, text.replace("backend: opensearch,", "backend: opensearch, connections: 4,")))
    assert _built(own.target).connections_per_node == 4  # the endpoint's own size wins over maxsize too


def test_each_layer_wins_whatever_spelling_it_uses(tmp_path):
    text = "extends: high-performance\ndatabases: {postgres: {pool: {min_connections: 3}}}\n" + PG_SOURCE % ""
    job = load_job(_job(tmp_path, text))
    assert job.databases.postgres.pool.min_connections == 3  # the job's name beats the template's alias
    job = load_job(_job(tmp_path, text), overrides=["databases.postgres.pool.min_size=2"])
    assert job.databases.postgres.pool.min_connections == 2
    assert _built(job.source).min_connections == 2


def test_a_job_given_as_parameters_keeps_its_defaults(tmp_path):
    from ferry.flows.spec import job_from_dict

    job = load_job(_job(tmp_path, "extends: memory-optimized\n" + PG_SOURCE % ""))
    again = job_from_dict(job.model_dump(mode="json"))
    assert _built(again.source).model_dump() == _built(job.source).model_dump()
    assert (_built(again.source).min_connections, _built(again.source).max_connections) == (5, 15)
