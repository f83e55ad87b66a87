"""``mfrctl ckpt ls`` on paths that are not there, and retention on an object store with folders (SeaweedFS)."""

from __future__ import annotations

import json

from mfr.trainer.storage import Storage, step_dir


def _mfrctl(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from mfr.ctl.main import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr.strip()


def test_ckpt_ls_of_a_path_that_does_not_exist_is_an_error_not_an_empty_list(tmp_path):
    code, out, err = _mfrctl("ckpt", "ls", str(tmp_path / "nonexistent" / "dir"))
    assert (code, out) == (2, "") and err == f"error: {tmp_path}/nonexistent/dir: no such folder (or prefix)"
    (tmp_path / "fresh").mkdir()
    code, _, err = _mfrctl("ckpt", "ls", str(tmp_path / "fresh"))
    assert code == 0 and err == f"no checkpoints under {tmp_path}/fresh"


def test_retention_on_s3_leaves_no_empty_step_prefix_and_ls_lists_none(s3_env, tmp_path):
    uri = f"s3://mfr-test/{tmp_path.name}/checkpoints"
    storage = Storage(uri)
    fs = storage.fs
    for step in (1, 2, 3):
        fs.pipe_file(storage.path(step_dir(step), "__0_0.distcp"), b"shard")
        storage.commit(step, {"world_size": 1, "bytes": 5})
    assert storage.retain(1) == [step_dir(1), step_dir(2)]

    def names() -> set[str]:
        fs.invalidate_cache()
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(storage.root, detail=True)}

    assert names() == {"latest", step_dir(3)}
    # an empty prefix as an older mfr left it: the objects gone, the store's folder entry kept
    fs.pipe_file(storage.path(step_dir(4), "__0_0.distcp"), b"shard")
    fs.rm(storage.path(step_dir(4)), recursive=True)
    assert step_dir(4) in names()  # SeaweedFS keeps empty folders: what made "uncommitted" ghosts
    code, out, err = _mfrctl("ckpt", "ls", uri, "-o", "json")
    assert code == 0, err
    assert [(c["name"], c["committed"]) for c in json.loads(out)] == [(step_dir(3), True)]
