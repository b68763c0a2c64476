"""jaxpeft.train.run_dir: one run writes a run folder at a time (a lock that dies with its process), and resuming
under a config that would change training is refused with the keys that differ; plus a full disk during a
checkpoint (simulated), which fails with the fix and leaves the earlier checkpoints intact."""
from __future__ import annotations

import hashlib
from pathlib import Path

from jaxpeft.errors import EXIT_USER_ERROR
from jaxpeft.train.config import load_config
from jaxpeft.train.run_dir import config_changes, lock_run_dir
from train_procs import cli, committed


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_second_run_on_a_locked_output_dir_is_refused_and_names_the_holder(make_config, tmp_path):
    config = make_config({}, tmp_path / "c.yaml")
    with lock_run_dir(tmp_path / "run"):
        rc, out, err = cli(["train", config])
    assert rc == EXIT_USER_ERROR
    assert "is in use by another run (pid" in err and "choose another train.output_dir" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # the refused run wrote nothing
    with lock_run_dir(tmp_path / "run"):  # released when its holder left the block
        pass


def test_only_the_keys_that_change_training_count_as_changes(make_config):
    base = load_config(make_config())
    assert config_changes(base, base) == []
    reporting = load_config(make_config({"train": {"eval_every": 7, "log_every": 3, "keep_last": 5},
                                         "generation": {"max_new_tokens": 4}, "mesh": {"data": 1}}))
    assert config_changes(base, reporting) == []
    changed = load_config(make_config({"optim": {"lr": 0.5}, "adapter": {"r": 2}, "train": {"steps": 9}}))
    assert [k for k, _, _ in config_changes(base, changed)] == ["adapter.r", "optim.lr"]  # steps: a note


def test_resuming_with_a_changed_lr_is_refused_naming_the_keys_and_nothing_is_touched(make_config, tmp_path):
    config = make_config({"train": {"steps": 2, "checkpoint_every": 2}}, tmp_path / "c.yaml")
    assert cli(["train", config])[0] == 0
    before = _digests(tmp_path / "run")
    changed = make_config({"train": {"steps": 4, "checkpoint_every": 2}, "optim": {"lr": 0.05}}, tmp_path / "d.yaml")
    rc, out, err = cli(["train", changed])
    assert rc == EXIT_USER_ERROR
    assert "would change how its checkpoints were trained: optim.lr: 0.01 -> 0.05. Restore" in err
    assert "train.allow_config_change: true" in err and "new train.output_dir" in err
    assert _digests(tmp_path / "run") == before
    # explicitly allowed: resumes from step 2
    rc, out, err = cli(["train", changed, "--set", "train.allow_config_change=true"])
    assert rc == 0, err
    assert "resumed from step 2" in out
    assert "note: train.steps changed from 2 to 4 since the checkpoints were written" in out


def test_a_full_disk_during_a_checkpoint_fails_with_the_fix_and_keeps_the_earlier_ones(make_config, tmp_path,
                                                                                        monkeypatch):
    config = make_config({"train": {"steps": 4, "checkpoint_every": 2, "keep_last": 1}}, tmp_path / "c.yaml")
    monkeypatch.setenv("JAXPEFT_FAULT", "checkpoint.begin@4:ENOSPC")
    rc, out, err = cli(["train", config])
    assert rc == EXIT_USER_ERROR
    assert "No space left on device" in err and "the disk is full" in err and "free space" in err
    assert "Traceback" not in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert committed(ckpts, 2) and not (ckpts / "4").exists()
    monkeypatch.delenv("JAXPEFT_FAULT")
    rc, out, err = cli(["eval", config])  # the kept checkpoint still restores
    assert rc == 0, err
    assert "eval_loss=" in out
