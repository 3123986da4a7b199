"""`breen.storage`: one storage layer for local disk and object stores (a real S3 API: `moto_server` on
127.0.0.1); URIs where only a local path works are refused naming the field, before anything runs or
is written."""

from __future__ import annotations

import pytest

from breen import generate, storage
from jobs import launch
from pipelines import prepare, raystart


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
    with pytest.raises(ValueError, match=r"^teacher\.model_config: s3://b/m\.json: must be a local file"):
        storage.require_local("s3://b/m.json", "teacher.model_config")


def test_prepare_fails_on_a_missing_bucket_before_ray_without_a_local_s3_folder(tmp_path, capsys, monkeypatch,
                                                                              s3_server):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(raystart, "init_ray", lambda *a, **k: pytest.fail("Ray started before the checks"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"output_dir: s3://no-such-bucket/prep\nstorage: {{endpoint_override: '{s3_server}'}}\n"
        "input: {synthetic: {n_images: 10}}\nteacher: {random_init_seed: 0}\n"
    )
    assert prepare.main(["--config", str(cfg)]) == 2
    assert "output_dir: s3://no-such-bucket/prep: bucket 'no-such-bucket' not found" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()
    cfg.write_text("output_dir: ftp://host/prep\ninput: {synthetic: {n_images: 10}}\nteacher: {random_init_seed: 0}\n")
    assert prepare.main(["--config", str(cfg)]) == 2
    assert "output_dir: ftp://host/prep: unknown storage scheme ftp://" in capsys.readouterr().err
    assert not (tmp_path / "ftp:").exists()


def test_train_checks_object_store_locations_before_ray_naming_the_field(tmp_path, capsys, monkeypatch, s3_server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(raystart, "init_ray", lambda *a, **k: pytest.fail("Ray started before the checks"))
    data = tmp_path / "shards"
    data.mkdir()
    endpoint = f"storage.endpoint_override={s3_server}"
    argv = ["--stage", "stage1", "--data", str(data), "--init-from", "tiny", "--profile", "cpu", "--set", endpoint]
    assert launch.main([*argv, "--output-dir", "s3://no-such-bucket/breen/train"]) == 2
    assert "output_dir: s3://no-such-bucket/breen/train: bucket 'no-such-bucket' not found" in capsys.readouterr().err
    assert launch.main(["--stage", "stage1", "--data", "s3://breen-test/no/shards", "--init-from", "tiny",
                       "--profile", "cpu", "--output-dir", str(tmp_path / "out"), "--set", endpoint]) == 2  # fmt: skip
    assert "data.paths[0]: s3://breen-test/no/shards: not found" in capsys.readouterr().err
    assert launch.main([*argv, "--output-dir", "ftp://host/train"]) == 2
    assert "output_dir: ftp://host/train: unknown storage scheme ftp://" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "ftp:").exists()


def test_generate_checks_its_inputs_before_loading_the_model(tmp_path, capsys, monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for model, needle in [("s3://breen-test/no/export", "--model: s3://breen-test/no/export: not a BREEN directory"),
                          ("/nonexistent/export", "--model: /nonexistent/export: not a BREEN directory"),
                          ("ftp://h/export", "--model: ftp://h/export: unknown storage scheme")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--model", model, "--prompt", "hi"])
        assert exit_info.value.code == 2
        assert needle in capsys.readouterr().err


def test_generate_checks_the_image_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # not loadable: the image check must come first
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(tmp_path), "--image", str(tmp_path / "none.jpg"), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert f"--image: {tmp_path / 'none.jpg'}: file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the storage layer


def test_local_store_is_path_like_and_writes_atomically(tmp_path):
    root = storage.Store.at(f"file://{tmp_path}/data", "output_dir")
    assert root.local and root.uri == f"{tmp_path}/data" and not root.exists()
    (root / "a" / "x.json").write_json({"b": 1, "a": [2]})
    (root / "a" / "y.bin").write_bytes(b"\x00\x01")
    assert (root / "a" / "x.json").read_json() == {"a": [2], "b": 1}
    assert (root / "a").names() == ["x.json", "y.bin"] and (root / "a").names(".bin") == ["y.bin"]
    assert sorted(p.name for p in (tmp_path / "data" / "a").iterdir()) == ["x.json", "y.bin"]  # no temp left
    root.delete()
    assert not (tmp_path / "data").exists() and root.names() == []


@pytest.mark.parametrize("how", ["argument", "query", "environment"])
def test_s3_store_round_trip_on_a_real_s3_api(s3_server, monkeypatch, how):
    uri, kwargs = f"s3://breen-test/rt-{how}/", {}
    if how == "argument":
        kwargs = {"endpoint_override": s3_server}
    elif how == "query":
        uri += f"?endpoint_override={s3_server.removeprefix('http://')}&scheme=http"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    root = storage.Store.at(uri, "output_dir", **kwargs)
    assert not root.local and root.uri == f"s3://breen-test/rt-{how}" and root.bucket == "breen-test"
    root.check_writable("output_dir")
    assert root.names() == []  # the write probe left nothing
    (root / "shard" / "part-00000.json").write_json({"rows": 3})
    (root / "shard" / "part-00000.done").write_bytes(b"")
    assert (root / "shard").is_dir() and (root / "shard" / "part-00000.done").is_file()
    assert (root / "shard" / "part-00000.json").read_json() == {"rows": 3}
    assert (root / "shard").names() == ["part-00000.done", "part-00000.json"]
    root.check_readable("data.paths[0]")
    root.delete()
    assert not (root / "shard" / "part-00000.json").exists()


def test_parquet_through_the_store_is_byte_identical_to_local(s3_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": ["a", "b"], "x": [1.5, 2.5]})
    for root in (
        storage.Store.at(tmp_path),
        storage.Store.at("s3://breen-test/pq", endpoint_override=s3_server),
    ):
        target = root / "part-00000.parquet"
        pq.write_table(table, target.path, filesystem=target.fs)
        assert pq.read_table(target.path, filesystem=target.fs).equals(table)
    remote = storage.Store.at("s3://breen-test/pq/part-00000.parquet", endpoint_override=s3_server)
    assert remote.read_bytes() == (tmp_path / "part-00000.parquet").read_bytes()


def test_bad_locations_fail_naming_the_field_and_the_uri(s3_server):
    with pytest.raises(
        storage.StorageError, match=r"^output_dir: hdfs://nn/x: unknown storage scheme hdfs://"
    ):
        storage.Store.at("hdfs://nn/x", "output_dir")
    with pytest.raises(
        storage.StorageError, match=r"output_dir: s3://no-such-bucket/p: bucket 'no-such-bucket' not found"
    ):
        storage.Store.at("s3://no-such-bucket/p", "output_dir", endpoint_override=s3_server).check_writable(
            "output_dir"
        )
    with pytest.raises(storage.StorageError, match=r"data\.paths\[0\]: s3://breen-test/absent: not found"):
        storage.Store.at("s3://breen-test/absent", endpoint_override=s3_server).check_readable(
            "data.paths[0]"
        )
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.Store.at("s3:///x", "output_dir")


def test_credentials_in_a_uri_are_refused_and_never_echoed():
    with pytest.raises(storage.StorageError) as err:
        storage.Store.at("s3://b/p?access_key=AKIA123&secret_key=hunter2", "output_dir")
    assert "credentials in a URI are refused" in str(err.value)
    assert "hunter2" not in str(err.value) and "AKIA123" not in str(err.value)


def test_local_checks_before_ray(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(storage.StorageError, match="is a file, not a folder"):
        storage.Store.at(f).check_writable("output_dir")
    with pytest.raises(storage.StorageError, match="cannot be created"):
        storage.Store.at(f / "sub").check_writable("output_dir")
    storage.Store.at(tmp_path / "new" / "deeper").check_writable("output_dir")
    assert not (tmp_path / "new").exists()
