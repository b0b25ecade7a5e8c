"""Local storage operations that must not depend on the process's current folder."""

import os

import pytest

from pipeline import storage


def test_remove_works_after_the_current_folder_is_deleted(tmp_path, monkeypatch):
    """What a Ray job's driver meets when its unpacked --working-dir is replaced under it
    (pipeline.inference.cluster.leave_working_dir): removing a run's staging folder at publish."""
    gone = tmp_path / "working_dir"
    gone.mkdir()
    staging = tmp_path / "out" / "_staging" / "key"
    staging.mkdir(parents=True)
    (staging / "run.json").write_text("{}")
    link = tmp_path / "out" / "link"
    link.symlink_to(staging)
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError):
        os.getcwd()

    storage.remove(str(link))
    assert not link.exists() and staging.exists()  # a link goes, not what it points at
    storage.remove(str(staging / "run.json"), recursive=False)
    with pytest.raises(IsADirectoryError):
        storage.remove(str(staging), recursive=False)
    storage.remove(str(tmp_path / "out" / "_staging"))
    storage.remove(str(tmp_path / "missing"))
    assert not (tmp_path / "out" / "_staging").exists()
