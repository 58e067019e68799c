from pathlib import Path

import pytest

from broker.config import load_settings
from broker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_spec():
    s = load_settings(None, environ={})
    assert s.queues.ttl_s == 900
    assert s.poll.max_wait_s == 30
    assert s.redis.url == ""
    assert s.events.max_events == 100


def test_shipped_config_files_load():
    assert load_settings(ROOT / "config" / "broker.toml", environ={}).server.port == 8080
    assert load_settings(ROOT / "config" / "test.toml", environ={}).poll.max_wait_s == 5


def test_env_overrides_file(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('[poll]\nmax_wait_s = 10\n[queues]\ntopics = ["connections"]\n')
    s = load_settings(
        f,
        environ={
            "BROKER_POLL_MAX_WAIT_S": "12.5",
            "BROKER_REDIS_URL": "redis://h:1/0",
            "BROKER_QUEUES_TOPICS": "connections, consents",
            "BROKER_SERVER_ACCESS_LOG": "true",
            "BROKER_UNRELATED": "x",
        },
    )
    assert s.poll.max_wait_s == 12.5
    assert s.redis.url == "redis://h:1/0"
    assert s.queues.topics == ("connections", "consents")
    assert s.server.access_log is True


@pytest.mark.parametrize(
    ("env", "key", "value"),
    [
        ({"BROKER_POLL_MAX_WAIT_S": "abc"}, "poll.max_wait_s", "abc"),
        ({"BROKER_QUEUES_TTL_S": "0"}, "queues.ttl_s", "0"),
        ({"BROKER_SERVER_PORT": "70000"}, "server.port", "70000"),
        ({"BROKER_REDIS_URL": "http://x"}, "redis.url", "http://x"),
        ({"BROKER_SIGNING_PROFILE": "jose"}, "signing.profile", "jose"),
        ({"BROKER_SERVER_ACCESS_LOG": "maybe"}, "server.access_log", "maybe"),
        ({"BROKER_SERVER_ALLOCATOR": "jemalloc"}, "server.allocator", "jemalloc"),
        ({"BROKER_POLL_HOLD_JITTER": "0.9"}, "poll.hold_jitter", "0.9"),
        ({"BROKER_AUTH_JWKS_FILE": "/nonexistent.json"}, "auth.jwks_file", "/nonexistent.json"),
        ({"BROKER_PUSH_MAX_ATTEMPTS": "0"}, "push.max_attempts", "0"),
        ({"BROKER_PUSH_MAX_BACKOFF_S": "0.5"}, "push.max_backoff_s", "0.5"),
        ({"BROKER_PUSH_TIMEOUT_S": "-1"}, "push.timeout_s", "-1"),
    ],
)
def test_bad_value_names_key_and_value(env, key, value):
    with pytest.raises(ConfigError) as e:
        load_settings(None, environ=env)
    assert key in e.value.message and value in e.value.message


def test_unknown_key_and_bad_file_are_errors(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text("[poll]\nmax_wait = 10\n")
    with pytest.raises(ConfigError, match=r"poll\.max_wait"):
        load_settings(f, environ={})
    f.write_text("[poll\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(f, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})
    f.write_text('[poll]\nmax_wait_s = "ten"\n')
    with pytest.raises(ConfigError, match=r"'poll\.max_wait_s' has value 'ten'"):
        load_settings(f, environ={})


def test_sections_are_the_settings_tables():
    import dataclasses

    from broker.config import Settings, sections

    assert sections() == {f.name for f in dataclasses.fields(Settings)}
    assert {"poll", "signing", "server"} <= sections()
