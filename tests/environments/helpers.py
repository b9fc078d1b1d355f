"""Package fixtures made on the spot: a wheel, an sdist whose setup.py leaves a mark, gems."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import zipfile

import pytest

OFFLINE = os.environ.get("SANDRUN_TEST_OFFLINE") == "1"
needs_network = pytest.mark.skipif(OFFLINE, reason="SANDRUN_TEST_OFFLINE=1: no package registry")


def make_wheel(directory: str, name: str, version: str, source: str) -> str:
    """A pure-Python wheel holding one module ``name`` (dashes become underscores)."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    path = os.path.join(directory, f"{module}-{version}-py3-none-any.whl")
    files = {
        f"{module}.py": source,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: sandrun-tests\n"
                               "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def make_sdist(directory: str, name: str, version: str, mark: str) -> str:
    """An sdist only (no wheel) whose setup.py creates ``mark`` if it is ever run."""
    base = f"{name}-{version}"
    path = os.path.join(directory, f"{base}.tar.gz")
    files = {
        "setup.py": (f"open({mark!r}, 'w').write('setup.py ran')\n"
                     f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n"),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def have(*tools: str) -> bool:
    return all(shutil.which(tool) for tool in tools)


def make_gem_source(directory: str, mark: str) -> str:
    """A local gem source (``file://`` URL) with a pure-Ruby gem, one that depends on it,
    and one with a native extension whose extconf.rb creates ``mark`` if run."""
    gems = os.path.join(directory, "src", "gems")
    os.makedirs(gems)
    specs = {
        "hello-sandrun": ('s.version = "0.1.0"; s.files = ["lib/hello-sandrun.rb"]',
                          {"lib/hello-sandrun.rb":
                           'module HelloSandrun; def self.hi; "hi"; end; end\n'}),
        "greeter-sandrun": (('s.version = "1.0.0"; s.files = ["lib/greeter-sandrun.rb"]\n'
                             '  s.add_runtime_dependency "hello-sandrun", "~> 0.1"'),
                            {"lib/greeter-sandrun.rb":
                             'require "hello-sandrun"\n'
                             'module GreeterSandrun; def self.greet; HelloSandrun.hi + "!"; '
                             'end; end\n'}),
        "native-sandrun": (('s.version = "0.2.0"; s.files = ["ext/extconf.rb"]\n'
                            '  s.extensions = ["ext/extconf.rb"]'),
                           {"ext/extconf.rb": f'File.write({mark!r}, "extconf ran")\n'}),
    }
    for name, (fields, files) in specs.items():
        project = os.path.join(directory, name)
        for member, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(project, member)), exist_ok=True)
            with open(os.path.join(project, member), "w") as f:
                f.write(text)
        with open(os.path.join(project, f"{name}.gemspec"), "w") as f:
            f.write(f'Gem::Specification.new do |s|\n  s.name = "{name}"; s.summary = "test"\n'
                    f'  s.authors = ["sandrun"]; s.license = "MIT"\n  {fields}\nend\n')
        subprocess.run(["gem", "build", f"{name}.gemspec"], cwd=project, check=True,
                       capture_output=True)
        for built in os.listdir(project):
            if built.endswith(".gem"):
                shutil.copy(os.path.join(project, built), gems)
    subprocess.run(["gem", "generate_index", "-d", os.path.join(directory, "src")], check=True,
                   capture_output=True)
    return "file://" + os.path.join(directory, "src") + "/"
