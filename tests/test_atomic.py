"""posttrain/atomic.py: outputs appear whole or not at all, wherever the output path points."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from posttrain.atomic import atomic_output_dir, atomic_write_text, check_output_dir
from posttrain.errors import PosttrainError


def siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("name, overwrite", [(".", False), ("sub/..", True), ("../work", False)])
def test_dot_and_dotdot_output_dirs_are_the_directory_they_name(tmp_path, monkeypatch, capsys, name, overwrite):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True) if name == "sub/.." else work.mkdir()
    monkeypatch.chdir(work)
    with atomic_output_dir(name, overwrite=overwrite) as tmp:
        (tmp / "model.txt").write_text("new")
    assert siblings(tmp_path) == ["work"]  # no temporary or old sibling left
    assert siblings(work) == ["model.txt"]
    assert Path.cwd() == work and siblings(Path(".")) == ["model.txt"]  # this process moved into the new one
    assert "note: " in capsys.readouterr().err  # a shell in the replaced directory must cd back in


def test_a_failed_rename_restores_the_old_directory_and_removes_the_temporary_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError("disk trouble")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["old.txt"]


def test_inputs_inside_the_output_dir_are_refused_before_anything_is_deleted(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "tok").mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    for inputs in (["run/ckpt.pt"], ["run/tok"], [str(run)], ["elsewhere.jsonl", "run/sub/../tok"]):
        with pytest.raises(PosttrainError, match=r"^input .* is inside the output directory run, which is replaced"):
            with atomic_output_dir("run", overwrite=True, inputs=inputs):
                pass
    assert siblings(tmp_path) == ["run"] and siblings(run) == ["ckpt.pt", "tok"]
    (tmp_path / "run2").symlink_to(run)  # through a link it is the same directory
    with pytest.raises(PosttrainError, match="is inside the output directory run2"):
        check_output_dir("run2", True, ["run/ckpt.pt"])
    assert check_output_dir("out", False, ["run/ckpt.pt"]) == tmp_path / "out"


def test_overwriting_a_symlinked_output_dir_replaces_its_target_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "disk" / "model", tmp_path / "runs" / "model"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link.parent.mkdir()
    link.symlink_to(real)
    with atomic_output_dir(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert siblings(link) == ["new.txt"]
    assert siblings(tmp_path / "runs") == ["model"] and siblings(tmp_path / "disk") == ["model"]


def test_outputs_get_the_umask_mode_not_private_temp_modes(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            atomic_write_text(tmp / "meta.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "meta.json").stat().st_mode) == 0o640


def test_the_root_is_not_an_output_dir():
    with pytest.raises(PosttrainError, match="is the file system root"):
        check_output_dir("/", overwrite=True)
