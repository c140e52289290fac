"""Settings come from CHATTERBOT_* variables and .env; .env.example lists every one with its default."""

from pathlib import Path

from chatterbot.settings import Settings, env_example

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_is_current():
    assert (ROOT / ".env.example").read_text() == env_example(), "run `make env-example`"


def test_env_example_lists_every_setting_with_its_default():
    listed = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            listed[key] = value
    defaults = Settings(_env_file=None).to_env()
    assert listed == defaults


def test_settings_read_prefixed_environment_and_comma_lists(monkeypatch):
    monkeypatch.setenv("CHATTERBOT_API_KEYS", "k1, k2")
    monkeypatch.setenv("CHATTERBOT_BREAKER_FAIL_MAX", "9")
    s = Settings(_env_file=None)
    assert s.api_keys == ["k1", "k2"]
    assert s.breaker_fail_max == 9


def test_settings_read_dotenv_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CHATTERBOT_MODEL_NAME=tiny\nCHATTERBOT_ADMIN_KEYS=a\n")
    s = Settings(_env_file=env_file)
    assert s.model_name == "tiny" and s.admin_keys == ["a"]
