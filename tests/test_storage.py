"""`itm_engine.storage`: atomic metadata writes, JSON errors that name the file, the output-folder
lock, the full-disk message, data fingerprints and the record of files read."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from itm_engine import storage


@pytest.mark.parametrize("stem, expected", [
    ("runs/sb-7.5", "runs/sb-7.5.json"), ("runs/report", "runs/report.json"), ("runs/v1.2.3", "runs/v1.2.3.json"),
    ("runs/report.json", "runs/report.json"), ("runs/report.md", "runs/report.json")])
def test_output_file_appends_the_suffix_to_a_name_with_dots(stem, expected):
    assert storage.output_file(stem, ".json") == Path(expected)


def test_atomic_write_replaces_the_whole_file_or_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    storage.atomic_write_text(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as caught:
        storage.atomic_write_text(path, '{"a": 2, "b": "' + "x" * 100_000 + '"}\n')
    assert caught.value.errno == errno.ENOSPC
    assert path.read_text() == '{"a": 1}\n'  # the old content, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left behind


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b'{"step": 3, "con', "Unterminated string"),
                                             (b"\xff\xfe", "codec can't decode")])
def test_read_json_names_the_file_and_what_to_do(tmp_path, content, reason):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not valid JSON") as caught:
        storage.read_json(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not valid JSON (") and reason in message
    assert message.endswith("delete it or the folder to start over")
    assert isinstance(caught.value, storage.CorruptFile)
    with pytest.raises(FileNotFoundError):
        storage.read_json(tmp_path / "missing.json")


def test_read_jsonl_skips_a_torn_row(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert storage.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_folder_lock_refuses_a_second_holder_and_is_released_after_the_block(tmp_path):
    folder = tmp_path / "out"
    with storage.folder_lock(folder, "itm-eval"):
        with pytest.raises(storage.FolderLocked, match=f"{folder} is in use by another process "
                                                       rf"\(itm-eval, pid {os.getpid()}\)"):
            with storage.folder_lock(folder, "itm-train"):
                pass
        with storage.folder_lock(folder, "itm-eval", enabled=False):  # a non-main process of the same run
            pass
    with storage.folder_lock(folder, "itm-train"):
        assert (folder / storage.LOCK_FILE).read_text() == f"itm-train, pid {os.getpid()}\n"


@pytest.mark.slow
def test_folder_lock_is_released_when_its_process_is_killed(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom itm_engine import storage\n"
         f"with storage.folder_lock({str(folder)!r}, 'itm-eval'):\n    print('locked', flush=True)\n"
         "    time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(storage.FolderLocked, match=f"pid {holder.pid}"):
            with storage.folder_lock(folder, "itm-eval"):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with storage.folder_lock(folder, "itm-eval"):  # the kernel released it
        pass


def test_disk_full_message_finds_enospc_and_edquot_through_the_chain(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "a.json"))
    message = storage.disk_full_message(full, tmp_path)
    assert message.startswith(f"no space left on device while writing to {tmp_path} ({tmp_path / 'a.json'})")
    assert "--resume" in message
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as cause:
            raise RuntimeError("checkpoint write failed") from cause
    except RuntimeError as wrapped:
        assert storage.disk_full_message(wrapped, tmp_path).startswith("disk quota exceeded")
    assert storage.disk_full_message(OSError(errno.EACCES, "denied"), tmp_path) is None
    assert storage.disk_full_message(ValueError("bad"), tmp_path) is None


def test_report_failure_prints_and_chooses_the_exit_code(tmp_path, capsys):
    assert storage.report_failure("itm-eval", OSError(errno.ENOSPC, "full"), tmp_path) == 1
    assert capsys.readouterr().err.startswith(f"itm-eval: error: no space left on device while writing to {tmp_path}")
    assert storage.report_failure("itm-train", storage.FolderLocked("busy"), tmp_path) == 2
    assert capsys.readouterr().err == "itm-train: error: busy\n"
    assert storage.report_failure("itm-train", RuntimeError("a bug"), tmp_path) is None
    assert capsys.readouterr().err == ""


def test_fingerprint_changes_name_each_file_and_what_changed(tmp_path):
    (tmp_path / "images").mkdir()
    examples, image, gone = tmp_path / "examples.json", tmp_path / "images" / "a.png", tmp_path / "images" / "b.png"
    for path, size in ((examples, 123), (image, 10), (gone, 5)):
        path.write_bytes(b"x" * size)
    outside = tmp_path.parent / f"{tmp_path.name}-candidates.json"
    outside.write_text("{}")
    files = [examples, image, gone, outside, tmp_path / "never-there.png"]
    before = {"data": storage.fingerprint(files, tmp_path), "model": {"unet/w.safetensors": [4, 1]}}
    assert set(before["data"]) == {"examples.json", "images/a.png", "images/b.png", str(outside)}
    assert storage.fingerprint_changes(before, before) == []

    examples.write_bytes(b"x" * 456)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    gone.unlink()
    (tmp_path / "images" / "c.png").write_bytes(b"new")
    after = {"data": storage.fingerprint([*files, tmp_path / "images" / "c.png"], tmp_path),
             "model": {"unet/w.safetensors": [5, 1]}}
    changes = storage.fingerprint_changes(before, after)
    assert changes[0] == "examples.json changed (size 123 -> 456)"
    assert changes[1].startswith("images/a.png changed (modified ")
    assert changes[2:] == ["images/b.png removed", "images/c.png added",
                           "model: unet/w.safetensors changed (size 4 -> 5)"]


def test_recording_reads_notes_files_read_under_the_watched_folders_only(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (data / "examples.json").write_text("[]")
    (data / "rows.csv").write_text("a,b\n")
    (elsewhere / "other.json").write_text("{}")
    with zipfile.ZipFile(data / "images.zip", "w") as archive:
        archive.writestr("img.png", b"png")
    candidates = elsewhere / "candidates.json"
    candidates.write_text("{}")
    with storage.recording_reads(data, candidates) as read:
        json.loads((data / "examples.json").read_text())
        with open(data / "rows.csv", newline="") as handle:
            handle.read()
        zipfile.ZipFile(data / "images.zip").close()
        (elsewhere / "other.json").read_text()
        candidates.read_text()
        (data / "written.json").write_text("{}")  # written, not read: not data the run depends on
    (data / "after.json").write_text("{}")
    (data / "after.json").read_text()  # after the block: not recorded
    assert read == {str(data / "examples.json"), str(data / "rows.csv"), str(data / "images.zip"), str(candidates)}
