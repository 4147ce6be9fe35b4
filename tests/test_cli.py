from __future__ import annotations

import os
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from llamascope.cli import _model_arg
from llamascope.engines.threads import usable_cores
from llamascope.settings import BUILTIN, Settings, describe_error
from tests.conftest import LLAMASCOPE, SEED_MODEL


def test_usable_cores_honours_a_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) >= 1
    assert usable_cores(tmp_path / "absent") >= 1


def test_model_argument() -> None:
    assert _model_arg("a=/models/x")[1].path == "/models/x"
    assert _model_arg("a=builtin")[1].path == BUILTIN
    upstream = _model_arg("a=openai+http://h1:30000/v1,openai+http://h2:30000/v1")[1]
    assert upstream.path is None and upstream.upstreams == ["http://h1:30000/v1", "http://h2:30000/v1"]
    with pytest.raises(Exception, match="NAME=PATH"):
        _model_arg("no-equals-sign")
    # Issue 13: a URL without openai+ said "http:/host/v1 does not exist"; a hub id only "does not exist".
    with pytest.raises(Exception, match="write openai\\+http://host/v1"):
        _model_arg("up=http://host/v1")
    from llamascope.engines.base import ModelLoadError
    from llamascope.engines.model_dir import check_model_dir

    with pytest.raises(ModelLoadError, match="Hugging Face hub ids are not fetched: download the model first"):
        check_model_dir(Path("meta-llama/Llama-3.2-11B-Vision-Instruct"))


def test_an_upstream_url_the_engines_client_cannot_call_is_refused_without_its_password(tmp_path: Path) -> None:
    """A port that is no number, or no host: the server started, "healthy", and every request was a 500 (its
    traceback naming the URL, password and all). Refused at start now, the URL shown without user and password,
    and a model's settings (an upstream_api_key among them) are not echoed back."""
    for url in ("http://gw:s3cret@h:port/v1", "http://gw:s3cret@:8000/v1", "ftp://gw:s3cret@h/v1", "http://[::1/v1"):
        with pytest.raises(Exception, match="must be an http\\(s\\) URL with a host") as refused:
            _model_arg(f"a=openai+{url}")
        assert "s3cret" not in str(refused.value), refused.value
    _model_arg("a=openai+http://gw:s3cret@h:8000/v1,openai+https://[::1]/v1")  # these are fine
    config = tmp_path / "llamascope.toml"
    config.write_text(
        '[models.a]\nupstreams = ["http://gw:s3cret@h:port/v1"]\nupstream_api_key = "sk-upstream-key-s3cret"\n'
    )
    out = llamascope(tmp_path, "serve", "--port", "1", "--config", str(config))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "'http://h:port/v1' must be an http(s) URL with a host" in out.stderr and "s3cret" not in out.stderr


def test_a_password_or_secret_in_a_wrong_setting_is_not_shown(tmp_path: Path) -> None:
    """A URL with a password given as a local path (openai+ forgotten), as one string instead of a list of
    upstreams, or without its NAME=; a secret too short: the error said the password, or the secret, whole."""
    for arg in ("a=http://gw:s3cret@h:8000/v1", "openai+http://gw:s3cret@h:8000/v1"):
        with pytest.raises(Exception, match=r"openai\+http://h:8000/v1|NAME=PATH") as refused:
            _model_arg(arg)
        assert "s3cret" not in str(refused.value), refused.value
    config = tmp_path / "llamascope.toml"
    config.write_text('upload_secret = "short-s3cret"\n[models.a]\nupstreams = "http://gw:s3cret@h:8000/v1"\n')
    out = llamascope(tmp_path, "serve", "--port", "1", "--config", str(config))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "models.a.upstreams: Input should be a valid list (given: 'http://h:8000/v1')" in out.stderr, out.stderr
    assert "upload_secret" in out.stderr and "s3cret" not in out.stderr, out.stderr


def test_a_config_file_names_the_test_model_as_the_command_line_does(tmp_path: Path) -> None:
    config = tmp_path / "llamascope.toml"
    config.write_text('[models.a]\npath = "builtin"\n[models.b]\npath = "builtin:test-model"\n')
    models = Settings.load(config).models
    assert models["a"].path == models["b"].path == BUILTIN and models["a"].is_builtin


@pytest.mark.slow
@pytest.mark.parametrize(
    "environment,expected",
    [({}, "30000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "passive"}, None)],
    ids=["default", "user's spin count", "user's wait policy"],
)
def test_openmp_spinning_is_set_before_torch_loads(environment: dict[str, str], expected: str | None) -> None:
    """In a fresh process, as the server starts: set before torch loads libgomp, never over the user's own."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, os, sys\n"
        "from llamascope.engines.threads import configure_torch\n"
        "configure_torch(1)\n"
        "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | environment
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [expected, True]


# -- the accounts commands, run as the operator runs them: the installed command on a real store ----------


def llamascope(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASCOPE_")}
    environment |= {"LLAMASCOPE_DATA_DIR": str(data_dir), **(env or {})}
    return subprocess.run([*LLAMASCOPE, *args], capture_output=True, text=True, env=environment, timeout=120)


def made_key(data_dir: Path, *args: str) -> str:
    out = llamascope(data_dir, "keys", "create", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.slow
def test_keys_are_found_by_the_whole_key_and_by_any_unambiguous_prefix(tmp_path: Path) -> None:
    """Issue 13, item 1: `keys revoke sk-<the whole key>` said "no key"; so did any prefix past 7 characters."""
    first, second, third = (made_key(tmp_path, "--name", name) for name in ("a", "b", "c"))
    out = llamascope(tmp_path, "keys", "grant", second[:12], "--model", SEED_MODEL, "--allowance", "77")
    assert out.returncode == 0, out.stderr
    assert "77" in out.stdout
    usage = llamascope(tmp_path, "usage", "--key", third)
    assert usage.returncode == 0 and "(no requests yet)" in usage.stdout
    revoked = llamascope(tmp_path, "keys", "revoke", first)  # pasted whole, as leaked
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked key 1" in revoked.stdout
    by_listed = llamascope(tmp_path, "keys", "revoke", third[:7] + "…")  # as `keys list` shows it
    assert by_listed.returncode == 0 and "revoked key 3" in by_listed.stdout, by_listed.stderr
    listing = llamascope(tmp_path, "keys", "list").stdout
    assert [line.split()[3] for line in listing.splitlines()[1:] if line.split()[0].isdigit()] == [
        "revoked",
        "active",
        "revoked",
    ]
    mistyped = second[:-1] + ("0" if second[-1] != "0" else "1")  # a whole key is matched by hash only
    out = llamascope(tmp_path, "keys", "revoke", mistyped)
    assert out.returncode == 2 and "no key" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "option", "said"),
    [
        (["keys", "create", "--expires-days", "0"], "--expires-days", "above 0"),
        (["keys", "create", "--allowance", "-5"], "--allowance", "whole number of tokens"),
        (["keys", "create", "--days", "-3"], "--days", "above 0"),
        (["keys", "create", "--days", "abc"], "--days", "number of days"),
        (["keys", "create", "--days", "1e400"], "--days", "at most 36525"),
        (["keys", "create", "--rpm", "0"], "--rpm", "whole number from 1"),
        (["keys", "grant", "1", "--model", SEED_MODEL, "--allowance", "lots"], "--allowance", "unlimited"),
        (["usage", "--days", "100000000"], "--days", "at most 36525"),
    ],
)
def test_nonsense_values_are_refused_naming_the_option(tmp_path: Path, args: list[str], option: str, said: str) -> None:
    """Issue 13, items 6 and 7: tracebacks (OverflowError, "could not convert string to float") and keys that
    never expire (--expires-days 0), negative allowances and periods."""
    out = llamascope(tmp_path, *args)
    assert out.returncode == 2
    assert f"argument {option}: must be" in out.stderr and said in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "llamascope.db").exists() or "(no" in llamascope(tmp_path, "keys", "list").stdout


def test_a_key_expires_when_told(tmp_path: Path) -> None:
    limits = ["--rpm", "60", "--tpm", "2000", "--concurrency", "2"]
    key = made_key(tmp_path, "--name", "bob", "--expires-days", "0.5", *limits)
    [row] = [line for line in llamascope(tmp_path, "keys", "list").stdout.splitlines() if key[:7] in line]
    expires = (datetime.now(UTC) + timedelta(days=0.5)).strftime("%Y-%m-%d")
    assert row.split()[3:5] == ["active", expires] and "60 rpm, 2000 tpm, 2 at once" in row  # expiry, limits


def test_a_key_made_without_models_covers_every_model(tmp_path: Path) -> None:
    """Issue 13, item 2: the key's one grant is '*', whatever the server serves; --model takes any name."""
    make_key = llamascope(tmp_path, "keys", "create")
    assert make_key.returncode == 0
    assert "* (every model)" in make_key.stderr and "unlimited" not in make_key.stderr
    named = llamascope(tmp_path, "keys", "create", "--model", "my-vision", "--allowance", "500")
    assert named.returncode == 0, named.stderr
    assert "warning: 'my-vision' is not among the models of these settings" in named.stderr
    assert "my-vision" in named.stderr and "500" in named.stderr


def test_a_config_files_model_allowance_may_be_unlimited(tmp_path: Path) -> None:
    """Docs review: accounts.md says a grant's allowance and period "may be unlimited", per model in the config
    (`allowance_tokens`, `allowance_days`), and the settings page said "None: unlimited"; TOML has no null,
    and "unlimited" (the CLI's word) was refused, so a config file could not say it."""
    config = tmp_path / "llamascope.toml"
    config.write_text('[models.m]\npath = "builtin"\nallowance_tokens = "unlimited"\nallowance_days = "Unlimited"\n')
    spec = Settings.load(config).models["m"]
    assert spec.allowance_tokens is None and spec.allowance_days is None
    made = llamascope(tmp_path, "keys", "create", "--config", str(config), "--model", "m")
    assert made.returncode == 0, made.stderr
    [row] = [line for line in made.stderr.splitlines() if " m " in f" {line} "]
    assert "unlimited" in row and "1,000,000" not in row and "1000000" not in row, made.stderr


@pytest.mark.parametrize("args", [["keys", "create", "--model", ""], ["keys", "grant", "KEY", "--model", " "]])
def test_an_empty_model_name_is_refused_without_a_granted_anyway_warning(tmp_path: Path, args: list[str]) -> None:
    """New-user trial: `keys create --model ''` warned "'' is not among the models ...; granted anyway", then
    refused the name and exited 2: the warning said the opposite of what happened."""
    if "KEY" in args:
        args = [made_key(tmp_path) if arg == "KEY" else arg for arg in args]
    out = llamascope(tmp_path, *args)
    assert out.returncode == 2 and "must be a model's name" in out.stderr
    assert "granted anyway" not in out.stderr and "warning" not in out.stderr, out.stderr


def test_help_says_what_each_option_does() -> None:
    """Issue 13: `keys grant --help` had no descriptions; `build-test-model` was undocumented."""
    import argparse

    from llamascope.cli import build_parser

    def parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
        found = [(parser.prog, parser)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += parsers(sub)
        return found

    for prog, parser in parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{prog}: {action.option_strings or action.dest} has no help"
    grant = subprocess.run([*LLAMASCOPE, "keys", "grant", "--help"], capture_output=True, text=True).stdout
    assert "the key itself" in grant and "'*'" in grant


def test_a_bad_setting_is_refused_naming_its_environment_variable(tmp_path: Path) -> None:
    out = llamascope(
        tmp_path, "serve", "--port", "1", env={"LLAMASCOPE_VISION_BATCH_TILES": "0", "LLAMASCOPE_MAX_BATCH_SIZE": "abc"}
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "LLAMASCOPE_VISION_BATCH_TILES (vision_batch_tiles): Input should be greater than or equal to 1" in out.stderr
    )
    assert "(given: '0')" in out.stderr and "LLAMASCOPE_MAX_BATCH_SIZE" in out.stderr, out.stderr
    # MAX_QUEUED=0 started, then refused every request with 429 (each waits for the model's thread to take it).
    out = llamascope(tmp_path, "serve", "--port", "1", env={"LLAMASCOPE_MAX_QUEUED": "0"})
    assert out.returncode == 2 and "LLAMASCOPE_MAX_QUEUED (max_queued)" in out.stderr, out.stderr


def test_a_log_level_logging_does_not_know_is_refused_as_a_setting(tmp_path: Path) -> None:
    """Docs review: `serve --log-level verbose` ended in logging's ValueError traceback, where settings.md says a
    wrong setting stops start-up with a message naming it; a level in capitals is still taken."""
    out = llamascope(tmp_path, "serve", "--port", "1", "--log-level", "verbose")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "LLAMASCOPE_LOG_LEVEL (log_level)" in out.stderr and "(given: 'verbose')" in out.stderr, out.stderr
    assert Settings.load(None, log_level="DEBUG").log_level == "debug"


@pytest.mark.parametrize("given,level", [("critical", "critical"), ("CRITICAL", "critical"), ("warn", "warning")])
def test_every_log_level_that_started_before_still_starts(given: str, level: str) -> None:
    """Review: the log_level check took debug, info, warning and error only; `critical` (and logging's `warn`),
    which logging took and a server ran with, were refused at start-up."""
    assert Settings.load(None, log_level=given).log_level == level


def test_a_redis_url_redis_cannot_use_is_refused_as_a_setting(tmp_path: Path) -> None:
    """Docs review: LLAMASCOPE_REDIS_URL=localhost:6379 loaded the models, made the first start's key (never
    shown), then ended in redis-py's ValueError traceback; now a bad setting's message, before anything."""
    out = llamascope(tmp_path, "serve", "--port", "0", env={"LLAMASCOPE_REDIS_URL": "localhost:6379"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "LLAMASCOPE_REDIS_URL (redis_url)" in out.stderr and "redis://" in out.stderr, out.stderr
    assert not (tmp_path / "llamascope.db").exists()


def test_the_redis_url_is_checked_as_redis_reads_it() -> None:
    """Review: the check looked at the scheme only, in any case: `REDIS://host:6379/0` and `?db=one` passed it, and
    start-up then ended in redis-py's ValueError traceback. Every form redis-py takes is still taken."""
    for url in ("redis://:pw@host/0", "unix:///run/redis.sock?db=1", "rediss://host", "redis://[::1]:6379/0"):
        assert Settings.load(None, redis_url=url).redis_url == url
    for url in ("REDIS://host:6379/0", "redis://host:6379?db=one"):
        with pytest.raises(ValidationError) as refused:
            Settings.load(None, redis_url=url)
        assert "LLAMASCOPE_REDIS_URL (redis_url)" in describe_error(refused.value), url


def test_a_metrics_port_in_use_stops_start_up_at_once(tmp_path: Path) -> None:
    """Docs review: deploy.md says a port in use stops start-up at once, before any model loads; with
    LLAMASCOPE_METRICS_PORT in use the models loaded, the banner was printed, then the app's start-up failed
    in a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = llamascope(tmp_path, "serve", "--port", "0", env={"LLAMASCOPE_METRICS_PORT": str(port)})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot listen on 127.0.0.1:{port} (LLAMASCOPE_METRICS_PORT)" in out.stderr, out.stderr
    assert "loading" not in out.stderr and not (tmp_path / "llamascope.db").exists(), out.stderr


@pytest.mark.slow
def test_a_start_that_fails_on_a_directory_writes_no_key_and_says_why(tmp_path: Path) -> None:
    """Docs review: accounts.md says a start that fails writes no key. An upload directory that could not be
    made failed start-up after the first key was made (never shown) and in a traceback."""
    (tmp_path / "a-file").write_text("")
    out = llamascope(tmp_path, "serve", "--port", "0", env={"LLAMASCOPE_UPLOAD_DIR": str(tmp_path / "a-file" / "up")})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "llamascope: cannot start:" in out.stderr and "a-file" in out.stderr, out.stderr
    assert "first start" not in llamascope(tmp_path, "keys", "list").stdout  # no key was made


@pytest.mark.parametrize(
    "name,value", [("public_base_url", "llm.example.com"), ("otlp_traces_endpoint", "collector:4318")]
)
def test_an_address_setting_without_its_scheme_is_refused(name: str, value: str) -> None:
    """Docs review: either, without its http(s)://, started a server (upload policies naming an address no SDK
    can post to; traces sent nowhere); settings.md says a wrong setting stops start-up, naming it."""
    with pytest.raises(ValidationError) as refused:
        Settings.load(None, **{name: value})
    said = describe_error(refused.value)
    assert f"LLAMASCOPE_{name.upper()} ({name})" in said and "http(s) URL" in said and repr(value) in said, said


@pytest.mark.parametrize("name", ["redis_url", "public_base_url", "otlp_traces_endpoint"])
def test_an_empty_address_setting_is_unset(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: `LLAMASCOPE_REDIS_URL=` or `LLAMASCOPE_PUBLIC_BASE_URL=` (as a compose file's `${VAR:-}` sets them)
    started a server without Redis, or naming the request's Host; the URL checks refused them, so that server no
    longer started."""
    monkeypatch.setenv(f"LLAMASCOPE_{name.upper()}", "")
    assert getattr(Settings.load(None), name) is None


def test_the_metrics_port_must_not_be_the_apis() -> None:
    """Docs review: LLAMASCOPE_METRICS_PORT equal to the API's port started both servers on it (each binds with
    SO_REUSEADDR), API requests and scrapes split between them."""
    with pytest.raises(ValidationError) as refused:
        Settings.load(None, port=9000, metrics_port=9000)
    said = describe_error(refused.value)
    assert "LLAMASCOPE_METRICS_PORT (metrics_port)" in said and "the API's port" in said, said
    assert Settings.load(None, port=9000, metrics_port=9100).metrics_port == 9100
