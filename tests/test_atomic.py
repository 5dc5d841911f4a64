"""posttrain/outputs/atomic.py and lock.py: outputs appear whole or not at all, wherever the output path points."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_read_only, small_tmpfs

from posttrain.outputs.atomic import atomic_output_dir, atomic_write_text, check_output_dir
from posttrain.outputs.errors import PosttrainError
from posttrain.outputs.lock import output_lock


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


# ------------------------------------------------------------------------ one writer per directory


def hold_lock_in_another_process(out: Path) -> subprocess.Popen:
    """A process that holds output_lock(out) until its stdin closes; returns once it holds it."""
    code = "import sys\nfrom posttrain.outputs.lock import output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_until_it_is_done(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock_in_another_process(out)
    try:
        with pytest.raises(PosttrainError) as err:
            with atomic_output_dir(out) as tmp:
                (tmp / "mine.txt").write_text("lost")
        assert str(err.value) == (
            f"output directory {out} is being written by another run (pid {holder.pid} on this host); "
            "wait for it to finish or choose another output directory"
        )
        assert siblings(tmp_path) == [".out.lock"]  # the holder's lock, nothing of the refused run
    finally:
        holder.communicate("")
    with atomic_output_dir(out) as tmp:
        (tmp / "mine.txt").write_text("written")
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["mine.txt"]


def test_a_stale_lock_is_taken_over_and_leftovers_of_killed_runs_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    (tmp_path / ".out.tmp-k1lled_1").mkdir()
    (tmp_path / ".out.tmp-k1lled_1" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.old-4242").mkdir()
    (tmp_path / ".outer.tmp-abcdefgh").mkdir()  # another directory's: kept
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert siblings(tmp_path) == [".outer.tmp-abcdefgh", "out"] and siblings(out) == ["new.txt"]
    err = capsys.readouterr().err
    assert f"note: {out}: took over the lock left by pid {dead.stdout.strip()}, which is no longer running" in err
    assert f"note: removed {tmp_path / '.out.tmp-k1lled_1'}, left by a killed run" in err


def test_a_directory_a_kill_left_renamed_away_is_put_back(tmp_path):
    """Killed between renaming the finished run aside and renaming the new one in: the finished run returns."""
    (tmp_path / ".out.old-4242").mkdir()
    (tmp_path / ".out.old-4242" / "model.txt").write_text("finished")
    (tmp_path / ".out.tmp-abcd1234").mkdir()
    with output_lock(tmp_path / "out"):
        pass
    assert siblings(tmp_path) == ["out"] and (tmp_path / "out" / "model.txt").read_text() == "finished"


@pytest.mark.parametrize("name", [".out.lock", ".out.tmp-abcd1234", ".out.old-4242"])
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_lock_or_leftover_path_this_tool_did_not_make_is_refused_and_never_followed(tmp_path, name, kind):
    """A symlink (or a fifo) at the lock or a leftover's name: refused in one line naming it, its target as it was,
    with --overwrite too (the output directory and whatever the link points at keep their files)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    target = elsewhere if name != ".out.lock" else elsewhere / "precious.txt"
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "model.txt").write_text("finished")
    path = work / name
    os.symlink(target, path) if kind == "symlink" else os.mkfifo(path)
    if name == ".out.old-4242":
        (work / "out").rename(work / "gone")  # the case where a leftover old directory would be put back
    for overwrite in (False, True):
        with pytest.raises(PosttrainError) as err:
            with atomic_output_dir(work / "out", overwrite=overwrite) as tmp:
                (tmp / "new.txt").write_text("new")
        assert str(err.value).startswith(f"{path} is {'a symlink' if kind == 'symlink' else 'not a regular'}")
        assert str(err.value).endswith(f"remove it yourself: rm {path}")
        assert "\n" not in str(err.value)
        assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]
        assert (elsewhere / "precious.txt").read_text() == "keep me"
        assert os.path.lexists(path)
        assert name == ".out.lock" or not os.path.lexists(work / ".out.lock")  # the lock was released
        assert not (work / "out").exists() if name == ".out.old-4242" else siblings(work / "out") == ["model.txt"]


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    lock = tmp_path / ".out.lock"
    lock.write_text("123 gpu-node-7\n")
    with pytest.raises(PosttrainError) as err:
        with output_lock(tmp_path / "out"):
            pass
    assert str(err.value).startswith(f"output directory {tmp_path / 'out'} is locked by pid 123 on host gpu-node-7")
    assert str(err.value).endswith(f"if no run is writing there, remove the lock: rm {lock}")
    assert lock.read_text() == "123 gpu-node-7\n"


def test_a_child_of_the_holder_writes_under_its_lock(tmp_path):
    """A launcher that holds the lock starts workers that write: they do not refuse their own launch."""
    out = tmp_path / "out"
    code = (
        "import sys\nfrom posttrain.outputs.lock import output_lock\nwith output_lock(sys.argv[1]):\n    print('in')\n"
    )
    with output_lock(out):
        child = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
        assert child.returncode == 0 and child.stdout == "in\n", child.stderr
        assert (tmp_path / ".out.lock").read_text().split()[0] == str(os.getpid())
    assert siblings(tmp_path) == []


def test_private_files_written_inside_come_out_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            for name, mode in (("sub/weights.bin", 0o600), ("run.sh", 0o700)):
                os.close(os.open(tmp / name, os.O_CREAT | os.O_WRONLY, mode))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*")}
    assert modes == {"sub": 0o755, "weights.bin": 0o644, "run.sh": 0o755}


def test_a_full_disk_is_one_line_naming_what_was_needed(tmp_path):
    with small_tmpfs(tmp_path / "fs", "64k") as fs:
        with pytest.raises(
            PosttrainError, match=r"^cannot write output directory .*: about 1\.0 MiB needed, 6\d\.\d KiB free"
        ):
            with atomic_output_dir(fs / "out", needed_bytes=1 << 20):
                raise AssertionError("not reached")
        with pytest.raises(PosttrainError) as err:  # a write that fills it: the tool could not know in advance
            with atomic_output_dir(fs / "out") as tmp:
                (tmp / "big.bin").write_bytes(b"x" * (128 << 10))
        assert str(err.value).startswith(f"cannot write output directory {fs / 'out'}: no space left on the device (")
        assert str(err.value).endswith("; nothing was written")
        assert siblings(fs) == []


def test_a_read_only_location_or_a_file_as_parent_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PosttrainError, match=r"^output directory .*/file/out: .*/file is a file, not a directory$"):
        check_output_dir(tmp_path / "file" / "out", overwrite=False)
    with small_tmpfs(tmp_path / "fs") as fs:
        make_read_only(fs)
        with pytest.raises(PosttrainError, match=r"^cannot write output directory .*: read-only file system \("):
            with atomic_output_dir(fs / "out"):
                raise AssertionError("not reached")
