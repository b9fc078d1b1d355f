"""Packing with .sandrunignore, and unpacking downloaded outputs without trusting them."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from sandrun.client.errors import UnsafeArchiveError
from sandrun.client.pack import IgnoreRules, extract_archive, pack_directory, write_output


def tree(root: str, files: dict[str, str]) -> None:
    for path, content in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(content)


def packed_names(root: str) -> list[str]:
    out = io.BytesIO()
    pack_directory(root, out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:gz") as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def tar_of(*members: tarfile.TarInfo, data: bytes = b"") -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    out.seek(0)
    return out


def regular(name: str, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, mode
    return info


# -- ignore rules -------------------------------------------------------------------------


@pytest.mark.parametrize(("patterns", "path", "is_dir", "ignored"), [
    (["*.log"], "a.log", False, True),
    (["*.log"], "deep/down/a.log", False, True),  # no slash: any depth
    (["*.log"], "a.logx", False, False),
    (["/top.txt"], "top.txt", False, True),  # leading slash: anchored
    (["/top.txt"], "sub/top.txt", False, False),
    (["docs/*.md"], "docs/a.md", False, True),  # middle slash: anchored
    (["docs/*.md"], "x/docs/a.md", False, False),
    (["docs/*.md"], "docs/sub/a.md", False, False),  # * stays in one component
    (["docs/**/*.md"], "docs/sub/deeper/a.md", False, True),
    (["**/cache"], "a/b/cache", True, True),
    (["build/"], "build", True, True),  # trailing slash: directories only
    (["build/"], "build", False, False),
    (["*.txt", "!keep.txt"], "keep.txt", False, False),  # last match wins
    (["*.txt", "!keep.txt"], "other.txt", False, True),
    (["!keep.txt", "*.txt"], "keep.txt", False, True),
    (["# comment", "", "   "], "# comment", False, False),
    (["\\#hash"], "#hash", False, True),
    (["\\!bang"], "!bang", False, True),
    (["file?.c"], "file1.c", False, True),
    (["file?.c"], "file10.c", False, False),
    (["[ab].py"], "a.py", False, True),
    (["[!ab].py"], "a.py", False, False),
    (["[!ab].py"], "c.py", False, True),
    (["[z-a].py"], "[z-a].py", False, True),  # a reversed range matches only itself
    (["trailing.txt   "], "trailing.txt", False, True),
])
def test_ignore_rules_follow_gitignore(patterns: list[str], path: str, is_dir: bool,
                                       ignored: bool) -> None:
    assert IgnoreRules(patterns).ignored(path, is_dir) is ignored


def test_packing_leaves_out_ignored_files_vcs_and_outputs_dirs(tmp_path: Path) -> None:
    root = str(tmp_path)
    tree(root, {"main.py": "print(1)", "data/a.csv": "1", "data/big.bin": "x",
                "logs/x.log": "l", "keep/x.log": "k", ".git/HEAD": "ref",
                "sub/__pycache__/m.pyc": "c", "sandrun-outputs/job-1/out.txt": "o",
                ".sandrunignore": "*.bin\nlogs/\n*.log\n!keep/x.log\n"})
    assert packed_names(root) == ["data/a.csv", "keep/x.log", "main.py"]


def test_an_excluded_directory_is_never_entered_even_for_negations(tmp_path: Path) -> None:
    root = str(tmp_path)
    tree(root, {"main.py": "", "build/keep.txt": "", ".sandrunignore": "build/\n!build/keep.txt\n"})
    assert packed_names(root) == ["main.py"]


def test_the_defaults_can_be_negated(tmp_path: Path) -> None:
    root = str(tmp_path)
    tree(root, {"main.py": "", ".git/HEAD": "", ".sandrunignore": "!.git/\n"})
    assert packed_names(root) == [".git/HEAD", "main.py"]


def test_packing_skips_links_and_records_hashes_sizes_and_modes(tmp_path: Path) -> None:
    root = str(tmp_path)
    tree(root, {"run.sh": "echo hi\n", "lib/util.py": "x = 1\n"})
    os.chmod(os.path.join(root, "run.sh"), 0o700)
    os.symlink("/etc/passwd", os.path.join(root, "passwd"))
    os.symlink("lib", os.path.join(root, "lib-link"))
    out = io.BytesIO()
    result = pack_directory(root, out)
    assert sorted(result.skipped) == [("lib-link", "symbolic link"), ("passwd", "symbolic link")]
    by_path = {f.path: f for f in result.files}
    assert set(by_path) == {"run.sh", "lib/util.py"}
    assert by_path["run.sh"].size == 8
    import hashlib
    assert by_path["lib/util.py"].sha256 == hashlib.sha256(b"x = 1\n").hexdigest()
    assert result.total_bytes == 8 + 6
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["run.sh"].mode == 0o755
    assert members["lib/util.py"].mode == 0o644
    assert members["lib"].isdir()
    assert all(m.uid == 0 and m.uname == "" for m in members.values())
    assert not any(m.issym() or m.islnk() for m in members.values())


# -- safe extraction ----------------------------------------------------------------------


def test_a_packed_tree_extracts_back_identically(tmp_path: Path) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    tree(src, {"a.txt": "alpha", "d/e/f.bin": "deep", "x.sh": "#!/bin/sh\n"})
    os.chmod(os.path.join(src, "x.sh"), 0o755)
    out = io.BytesIO()
    pack_directory(src, out)
    out.seek(0)
    written = extract_archive(out, dest)
    assert sorted(written) == ["a.txt", "d/e/f.bin", "x.sh"]
    with open(os.path.join(dest, "d/e/f.bin")) as f:
        assert f.read() == "deep"
    assert os.stat(os.path.join(dest, "x.sh")).st_mode & 0o100
    assert not os.stat(os.path.join(dest, "a.txt")).st_mode & 0o111


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                                  tarfile.CHRTYPE])
def test_links_and_special_members_are_refused(tmp_path: Path, kind: bytes) -> None:
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = kind, "/etc/passwd"
    with pytest.raises(UnsafeArchiveError, match="evil"):
        extract_archive(tar_of(link), str(tmp_path))
    assert not os.path.lexists(tmp_path / "evil")


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/abs/escape.txt",
                                  "C:/escape.txt", "a\\..\\escape.txt"])
def test_names_that_leave_the_destination_are_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tar_of(regular(name, 1), data=b"x"), str(dest))
    assert not (tmp_path / "escape.txt").exists()
    assert not os.path.exists("/abs/escape.txt")


def test_an_existing_symlink_in_the_destination_is_not_followed(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    os.symlink(str(outside), str(dest / "sub"))
    os.symlink(str(outside / "target.txt"), str(dest / "file.txt"))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tar_of(regular("sub/x.txt", 1), data=b"x"), str(dest))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tar_of(regular("file.txt", 1), data=b"x"), str(dest))
    assert os.listdir(outside) == []


def test_an_existing_file_is_replaced_not_written_through(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("precious")
    os.link(elsewhere, dest / "out.txt")  # a hard link into the destination
    extract_archive(tar_of(regular("out.txt", 3), data=b"new"), str(dest))
    assert (dest / "out.txt").read_text() == "new"
    assert elsewhere.read_text() == "precious"


def test_extraction_stops_past_max_bytes(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="too large"):
        extract_archive(tar_of(regular("a", 10), regular("b", 10), data=b"0123456789"),
                        str(tmp_path), max_bytes=15)


def test_a_corrupt_archive_is_an_error_not_a_crash(tmp_path: Path) -> None:
    good = tar_of(regular("a.txt", 5000), data=os.urandom(5000)).getvalue()
    with pytest.raises(UnsafeArchiveError):
        extract_archive(io.BytesIO(good[: len(good) // 2]), str(tmp_path))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(io.BytesIO(b"not an archive at all"), str(tmp_path))


def test_write_output_refuses_escaping_paths(tmp_path: Path) -> None:
    assert write_output(str(tmp_path), "a/b.txt", [b"ok"]) == str(tmp_path / "a" / "b.txt")
    for bad in ("../x", "/etc/x", "a/../../x", ""):
        with pytest.raises(UnsafeArchiveError):
            write_output(str(tmp_path / "d"), bad, [b"no"])
    assert not (tmp_path / "x").exists()


def test_secrets_installed_dependencies_and_git_files_are_left_out_by_default(
        tmp_path: Path) -> None:
    root = str(tmp_path)
    tree(root, {"main.py": "", ".env": "TOKEN=1", ".env.local": "TOKEN=2", "app/.env": "x",
                ".venv/lib/site.py": "", "node_modules/x/index.js": "", ".gitignore": "",
                ".gitattributes": "", ".github/workflows/ci.yml": "", "environment.yml": ""})
    assert packed_names(root) == ["environment.yml", "main.py"]


def test_the_gitignore_is_honoured_and_the_sandrunignore_wins_over_it(tmp_path: Path) -> None:
    root = str(tmp_path)
    tree(root, {"main.py": "", "build/out.o": "", "notes.tmp": "", "keep.tmp": "", ".env": "",
                ".gitignore": "build/\n*.tmp\n", ".sandrunignore": "!keep.tmp\n!.env\n"})
    assert packed_names(root) == [".env", "keep.tmp", "main.py"]
