from pathlib import Path

import pytest

from nexus_bus.bus.replies import error_of, error_reply, status_of
from nexus_bus.config import ConfigError, load_settings
from nexus_bus.errors import (
    ERRORS_BY_CODE,
    NexusError,
    NotFound,
    RemoteError,
    UpstreamTimeout,
    error_from_code,
)


def test_every_code_is_stable_snake_case_with_a_status() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        assert code == cls.code and code.islower() and " " not in code
        assert 400 <= cls.http_status < 600
    assert issubclass(UpstreamTimeout, TimeoutError) and UpstreamTimeout.retryable


def test_error_reply_round_trips_to_the_same_error() -> None:
    reply = error_reply(NotFound("no such key"), "rid-1")
    assert reply.status == 404 and status_of(reply.headers) == 404
    assert reply.headers["Nats-Service-Error-Code"] == "404"
    err = error_of(reply.status, reply.body)
    assert isinstance(err, NotFound) and err.detail == "no such key"


def test_unknown_codes_keep_their_status() -> None:
    err = error_from_code("teapot", "short and stout", 418)
    assert isinstance(err, RemoteError) and err.http_status == 418 and err.code == "teapot"
    assert isinstance(error_from_code("weird", None, 99), NexusError)


def test_error_header_is_sanitised() -> None:
    reply = error_reply(NotFound("bad\r\nInjected: yes"), "rid")
    assert "\r" not in reply.headers["Nats-Service-Error"]


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_NATS__URL", "nats://a:1,nats://b:2")
    monkeypatch.setenv("NEXUS_WORKER__CONCURRENCY", "7")
    s = load_settings()
    assert s.nats.servers == ["nats://a:1", "nats://b:2"] and s.worker.concurrency == 7


def test_bad_config_lists_every_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_WORKER__CONCURRENCY", "many")
    monkeypatch.setenv("NEXUS_LIMITS__MAX_DEPTH", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "worker.concurrency" in str(info.value) and "limits.max_depth" in str(info.value)


def test_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_NATS__PASSWORD", "hunter2")
    s = load_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "nexus.toml"
    path.write_text('service = "from-toml"\n[worker]\nconcurrency = 3\n')
    monkeypatch.setenv("NEXUS_CONFIG", str(path))
    monkeypatch.setenv("NEXUS_WORKER__CONCURRENCY", "5")
    s = load_settings()
    assert s.service == "from-toml" and s.worker.concurrency == 5


def test_retry_after_travels_with_the_error() -> None:
    from nexus_bus.errors import RateLimited

    reply = error_reply(RateLimited("slow down", retry_after=2.2), "rid")
    assert reply.headers["Retry-After"] == "3"
    err = error_of(reply.status, reply.body, reply.headers)
    assert isinstance(err, RateLimited) and err.retry_after == 3


def test_redis_cluster_is_selected_by_url() -> None:
    from nexus_bus.config import RedisSettings

    cluster = RedisSettings(url="redis+cluster://10.0.0.1:7000/0")
    assert cluster.cluster and cluster.url == "redis://10.0.0.1:7000/0"
    tls = RedisSettings(url="rediss+cluster://h:7000")
    assert tls.cluster and tls.url == "rediss://h:7000"
    single = RedisSettings(url="redis://h:6379/0")
    assert not single.cluster and single.url == "redis://h:6379/0"


@pytest.mark.parametrize(
    "name",
    [
        "NEXUS_CONSUL__ADRESS",  # a typo of a setting
        "NEXUS_CONSULL__ENABLED",  # a typo of a section
        "NEXUS_NATS__URL__HOST",  # below a setting that has no parts
        "NEXUS_AI__BACKENDS__OLLAMA__BASEURL",  # below a named entry of a table
    ],
)
def test_a_misspelt_setting_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Ignored, it left the setting at its default: Consul off, the wrong NATS, no backend.
    monkeypatch.setenv(name, "x")
    with pytest.raises(ConfigError) as info:
        load_settings(discover=False)
    assert f"unknown setting {name}" in str(info.value)


def test_every_setting_in_the_environment_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "NEXUS_CONSUL__TLS__VERIFY": "false",
        "nexus_worker__concurrency": "3",
        "NEXUS_AI__BACKENDS__OLLAMA__BASE_URL": "http://127.0.0.1:11434/v1",
        "NEXUS_AI__BACKENDS__OLLAMA__MODELS": '["llama3.2"]',
        "NEXUS_RESILIENCE__OPS__DATA__ATTEMPTS": "2",
        "NEXUS_TOKEN": "not a setting, read by `call`",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings(discover=False)
    assert not s.consul.tls.verify and s.worker.concurrency == 3
    assert s.resilience.ops["data"].attempts == 2 and "ollama" in s.ai.backends


def test_a_list_setting_that_is_not_json_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEXUS_CONSUL__TAGS", "a,b")
    with pytest.raises(ConfigError) as info:
        load_settings(discover=False)
    assert "consul" in str(info.value) and "JSON" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("NEXUS_REDIS__URL", "foo", "redis.url: "),
        ("NEXUS_REDIS__URL", "http://127.0.0.1:6379", "redis.url: "),
        ("NEXUS_REDIS__URL", "redis://:abc", "redis.url: "),
        ("NEXUS_REDIS__URL", "redis://127.0.0.1:6379/abc", "redis.url: "),
        ("NEXUS_NATS__URL", "http://127.0.0.1:4222", "nats.url: "),
        ("NEXUS_NATS__URL", "nats://127.0.0.1:4222,nats://h:port", "nats.url: "),
    ],
)
def test_a_malformed_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    """Before: redis-py's ValueError as a traceback when the shim or worker started (exit 3
    or 1); nats-py's 'Name or service not known' for host 'http'."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(discover=False)
    assert said in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NEXUS_REDIS__URL", "redis://:secret@cache.internal:6380/2"),
        ("NEXUS_REDIS__URL", "rediss+cluster://10.0.0.1:7000"),
        ("NEXUS_REDIS__URL", "unix:///run/redis.sock?db=1"),
        ("NEXUS_NATS__URL", "nats://a:1, tls://b:2"),
        ("NEXUS_NATS__URL", "127.0.0.1:4222"),
        ("NEXUS_NATS__URL", "nats"),
        ("NEXUS_NATS__URL", "wss://nats.example.com/ws"),
    ],
)
def test_every_url_the_clients_take_is_accepted(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    load_settings(discover=False)


def test_a_misspelt_key_in_the_toml_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: a section ignored a key it did not have, so Consul stayed off, as with a
    misspelt variable; a misspelt top-level key was refused already."""
    path = tmp_path / "nexus.toml"
    path.write_text(
        '[consul]\nenabeld = true\n[ai.backends.ollama]\nbase_url = "http://h/v1"\n'
        'models = ["m"]\nmodel = "m"\n[resilience.ops.data]\nattempts = 2\n'
    )
    monkeypatch.setenv("NEXUS_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        load_settings(discover=False)
    said = str(info.value)
    assert f"unknown setting consul.enabeld (in {path})" in said
    assert f"unknown setting ai.backends.ollama.model (in {path})" in said
    assert "resilience" not in said
