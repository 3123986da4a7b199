"""breen.lease: one writer per folder, on local disk and on a real S3 API (moto_server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from breen import lease
from breen.storage import Store


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return Store.at(tmp_path / "dataset")
    endpoint = request.getfixturevalue("s3_server")
    return Store.at(f"s3://breen-test/lease-{uuid.uuid4().hex[:8]}/dataset", endpoint_override=endpoint)


def test_a_second_run_fails_at_once_naming_the_holder(folder):
    with lease.held(folder) as first:
        t0 = time.monotonic()
        with pytest.raises(lease.LeaseHeld) as err:
            lease.acquire(folder)
        assert time.monotonic() - t0 < 5
        assert first._record.owner in str(err.value) and "last renewed" in str(err.value)
        assert lease.holder(folder) is not None
    assert lease.holder(folder) is None  # released
    lease.acquire(folder).release()  # and free for the next run


def test_a_waiting_run_gets_the_lease_when_the_holder_releases(folder):
    first = lease.acquire(folder)
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    second = lease.acquire(folder, wait_s=30, poll_s=0.2)
    assert 0.8 < time.monotonic() - t0 < 30
    second.release()


def test_of_racing_runs_exactly_one_gets_the_lease(folder):
    won, lost = [], []
    start = threading.Barrier(6)

    def race() -> None:
        start.wait()
        try:
            won.append(lease.acquire(folder))
        except lease.LeaseHeld:
            lost.append(1)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5
    won[0].release()


def test_a_stale_lease_is_taken_over_and_its_holder_finds_out(folder, capsys):
    stalled = lease.acquire(folder, ttl_s=1.0)
    stalled._stop.set()  # the holder stops renewing (a hung or killed driver)
    stalled._thread.join()
    time.sleep(1.5)
    successor = lease.acquire(folder, ttl_s=30)
    assert f"took over the lease of {stalled._record.owner}" in capsys.readouterr().out
    stalled.check()  # not known yet: the stalled holder has not tried to renew
    assert stalled.renew() is False
    with pytest.raises(lease.LeaseLost, match="now held by " + successor._record.owner):
        stalled.check()
    stalled.release()  # a lost lease is not deleted: the successor keeps it
    assert lease.holder(folder) is not None
    assert successor.renew() is True
    successor.release()


def test_the_holder_renews_while_it_runs(tmp_path):
    folder = Store.at(tmp_path)
    with lease.held(folder, ttl_s=0.8) as held:
        time.sleep(2.0)  # longer than the lease's life: renewals keep it alive
        held.check()
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(folder)
    path = tmp_path / lease.LEASE_FILE
    assert not path.exists()


def test_a_torn_lease_file_counts_as_live_until_its_age_says_otherwise(tmp_path):
    path = tmp_path / lease.LEASE_FILE
    path.write_text("{not json")
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(tmp_path)
    old = time.time() - lease.DEFAULT_TTL_S - 5
    os.utime(path, (old, old))
    held = lease.acquire(tmp_path)
    assert json.loads(path.read_text())["owner"] == held._record.owner
    held.release()


def test_the_lease_of_a_killed_process_on_this_host_is_taken_at_once(tmp_path, capsys):
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", f"from breen import lease; lease.acquire({str(tmp_path)!r})"],
                           capture_output=True, text=True, timeout=60)  # exits without releasing it
    assert child.returncode == 0, child.stderr
    assert lease.holder(tmp_path) is not None  # young: it would be waited out on another host
    held = lease.acquire(tmp_path)
    assert "its process is gone" in capsys.readouterr().out
    held.release()
