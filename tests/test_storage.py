"""`breen.storage`: object-storage URIs are refused where a path is given (until issue 16), naming the
field, before anything runs or is written; local paths and file:// URIs pass."""

from __future__ import annotations

import pytest

from breen import generate, storage
from jobs import train
from pipelines import prepare


@pytest.mark.parametrize(
    ("path", "kind"), [("s3://b/p", "s3"), ("GS://b", "gs"), ("file:///tmp/x", "file"), ("/tmp/x", None),
                       ("runs/demo", None), ("C:/data", None), ("s3:/b", None)],
)  # fmt: skip
def test_scheme(path, kind):
    assert storage.scheme(path) == kind


def test_require_local():
    assert storage.require_local("runs/x", "output_dir") == "runs/x"
    assert storage.require_local("file:///tmp/x", "output_dir") == "/tmp/x"
    assert storage.require_local(None, "output_dir") is None
    with pytest.raises(ValueError, match=r"^input\.urls\[0\]: s3://b/u\.parquet: s3:// is not supported yet"):
        storage.require_local("s3://b/u.parquet", "input.urls[0]")


def test_prepare_refuses_an_s3_output_dir_without_writing_a_local_s3_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "output_dir: s3://my-bucket/prep\ninput: {synthetic: {n_images: 10}}\nteacher: {random_init_seed: 0}\n"
    )
    assert prepare.main(["--config", str(cfg)]) == 2
    assert "output_dir: s3://my-bucket/prep: s3:// is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_train_refuses_uris_naming_the_flag_field(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "shards"
    data.mkdir()
    argv = ["--stage", "stage1", "--data", str(data), "--init-from", "tiny", "--profile", "cpu"]
    assert train.main([*argv, "--output-dir", "s3://my-bucket/breen/train"]) == 2
    assert "output_dir: s3://my-bucket/breen/train: s3:// is not supported yet" in capsys.readouterr().err
    assert train.main(["--stage", "stage1", "--data", "gs://b/shards", "--init-from", "tiny", "--profile", "cpu",
                       "--output-dir", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "data.paths[0]: gs://b/shards: gs:// is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "s3://b/export"], "--model: s3://b/export: s3:// is not supported yet"),
        (["--model", "/nonexistent/export"], "--model: /nonexistent/export: not a BREEN directory"),
    ],
)
def test_generate_checks_its_inputs_before_loading_the_model(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*argv, "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_generate_checks_the_image_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # not loadable: the image check must come first
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(tmp_path), "--image", str(tmp_path / "none.jpg"), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert f"--image: {tmp_path / 'none.jpg'}: file not found" in capsys.readouterr().err
