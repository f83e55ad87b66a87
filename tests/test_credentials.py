"""No credential in a config, none printed (trainer/credentials.py).

A config is rendered into the run's ConfigMap, its config.yaml and every COMMITTED
record, so a secret in it leaks everywhere: refused at any depth of every
``storage_options``, and as a URL with user info anywhere.  URLs that reach a printed
line anyway lose their user info.
"""

from __future__ import annotations

import json

import pytest

from mfr.trainer.config import ConfigError, load_config

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"


@pytest.mark.parametrize("section", ["checkpoint", "data", "distill"])
@pytest.mark.parametrize("path", ["client_kwargs.aws_secret_access_key", "config_kwargs.proxies.Token", "endpoint_url"])
def test_a_credential_at_any_depth_of_storage_options_is_refused_by_its_path(section, path):
    value = f"http://minio:{SECRET}@minio:9000" if path == "endpoint_url" else SECRET
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"{section}.storage_options.{path}={value}"])
    message = str(refused.value)
    assert message.startswith(f"{section}.storage_options: storage_options must not hold credentials ({path})")
    assert "AWS_SECRET_ACCESS_KEY" in message and SECRET not in message


@pytest.mark.parametrize("field", ["checkpoint.uri", "data.uri", "distill.features", "checkpoint.resume"])
def test_a_url_with_user_info_is_refused_in_any_setting_and_not_echoed(field):
    url = f"https://reader:{SECRET}@data.example.com/faces/step-00000001"
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.source=folder", "data.uri=/data/faces", f"{field}={url}"])
    assert SECRET not in str(refused.value) and field in str(refused.value), refused.value


def test_mfrctl_render_refuses_a_nested_secret_instead_of_rendering_it():
    from typer.testing import CliRunner

    from mfr.ctl.main import app

    result = CliRunner().invoke(
        app,
        [
            "render",
            "--name",
            "r1",
            "--nodes",
            "1",
            "--image",
            "registry.example.com/mfr:1",
            "--set",
            f"train.checkpoint.storage_options.client_kwargs.aws_secret_access_key={SECRET}",
        ],
    )
    assert result.exit_code == 2
    assert SECRET not in result.stdout + result.stderr
    assert "client_kwargs.aws_secret_access_key" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_user_info_of_urls_is_redacted_wherever_errors_and_logs_are_printed(monkeypatch, tmp_path, capsys):
    from mfr.ctl.console import Output, fail, print_data
    from mfr.trainer.progress import EVENTS_ENV, Progress, configure, log
    from mfr.trainer.storage import Storage, StorageError

    endpoint = f"http://minio:{SECRET}@127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # from the environment: never checked by the config
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mfr")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mfr")
    with pytest.raises(StorageError) as failed:  # botocore refuses the URL; the error names the endpoint
        Storage("s3://bucket/run/checkpoints", retries=0).checkpoints()
    assert "(endpoint http://***@127.0.0.1:9)" in str(failed.value) and SECRET not in str(failed.value)

    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "events.jsonl"))
    progress = Progress(enabled=True)
    configure(None)  # the handler a launcher process has, writing to the streams capsys holds
    log.info(f"checkpoint committed to {endpoint}/ckpt")
    log.error(f"cannot write {endpoint}/ckpt")
    progress.event("checkpoint", url=f"{endpoint}/ckpt")
    progress.close()
    fail(f"cannot reach {endpoint}")
    print_data({"source": endpoint}, Output.json)
    printed = capsys.readouterr()
    events = (tmp_path / "events.jsonl").read_text()
    assert SECRET not in printed.out + printed.err + events
    assert "committed to http://***@127.0.0.1:9/ckpt" in printed.out and "cannot reach http://***@" in printed.err
    assert "mfr: cannot write http://***@127.0.0.1:9/ckpt" in printed.err
    assert json.loads(events)["url"] == "http://***@127.0.0.1:9/ckpt"
    assert str(ConfigError(f"{endpoint}: no such folder")) == "http://***@127.0.0.1:9: no such folder"
