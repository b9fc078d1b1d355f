"""Request bodies the tests build by hand: multipart forms and tarballs.

Shared by the in-memory route tests and the real-worker integration tests.
"""

from __future__ import annotations

import io
import tarfile


def multipart(fields: dict[str, str], files: list[tuple[str, bytes]],
              boundary: str = "sandrun-test-boundary-7d1c") -> tuple[bytes, str]:
    """A multipart/form-data body: text ``fields`` and ``files`` parts (all named ``files``)."""
    out = io.BytesIO()
    b = boundary.encode()
    for name, value in fields.items():
        out.write(b"--" + b + b"\r\nContent-Disposition: form-data; name=\"" + name.encode()
                  + b"\"\r\n\r\n" + value.encode() + b"\r\n")
    for filename, data in files:
        out.write(b"--" + b + b"\r\nContent-Disposition: form-data; name=\"files\"; "
                  b"filename=\"" + filename.encode("utf-8", "surrogateescape") + b"\"\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    out.write(b"--" + b + b"--\r\n")
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def tar_bytes(members: dict[str, bytes | str], gz: bool = True,
              executable: tuple[str, ...] = ()) -> bytes:
    """A tar (gzip by default) of regular files ``name -> content``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name in executable else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
