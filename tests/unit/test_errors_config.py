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
