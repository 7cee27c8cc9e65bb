"""CURVE key files: make key pairs, read them, and keep the directory of authorised keys.

The files are ZeroMQ's certificate format (as czmq and ``zmq.auth`` write them), so
keys made elsewhere work here and the other way round::

    # <name>.key: the public key, safe to copy anywhere
    curve
        public-key = "<40 characters of Z85>"

``<name>.key_secret`` holds the same plus ``secret-key = "..."`` and is written with
mode 0600.  The authorised directory holds one ``<name>.key`` per client allowed in;
removing the file revokes the key (servers notice within a second).

Nothing here touches a socket: :mod:`zarkov.security` does that.
"""
from __future__ import annotations

import datetime as dt
import glob
import os
import re

import zmq
from zmq.utils import z85

from zarkov.errors import BadInput
from zarkov.oneline import short_repr

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
_BANNER = ("#   Zarkov CURVE {what} key, made {when}{warning}\n"
           "#   (ZeroMQ certificate format: czmq and pyzmq's zmq.auth read it too)\n\n")


class KeyFileError(BadInput, ValueError):
    """A key file that is missing, unreadable or holds no valid key; names the file."""


def _valid(z85_key: bytes) -> bool:
    try:
        return len(z85_key) == 40 and len(z85.decode(z85_key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def read_key_file(path: str, secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys from a key file; ``secret`` requires the secret key.

    Raises KeyFileError naming the file when it cannot be read, holds no valid key,
    or (for a secret file) when its public key is not the secret key's.
    """
    public = private = None
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if line.startswith(b"#") or b"=" not in line:
                    continue
                name, value = (part.strip() for part in line.split(b"=", 1))
                value = value.strip(b"'\"")
                if name == b"public-key":
                    public = value
                elif name == b"secret-key":
                    private = value
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a key file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise KeyFileError(f"{short_repr(path)}: not a usable path ({e})") from None
    if public is None or not _valid(public):
        raise KeyFileError(f"{path}: not a CURVE key file (no valid public-key line)")
    if secret:
        if private is None:
            raise KeyFileError(f"{path}: holds only a public key; a secret key file "
                               f"(*{SECRET_SUFFIX}) is needed here")
        if not _valid(private) or zmq.curve_public(private) != public:
            raise KeyFileError(f"{path}: its secret-key is not valid or does not match "
                               f"its public-key")
    return public, private


def read_key_pair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a secret key file; KeyFileError as read_key_file."""
    public, private = read_key_file(path, secret=True)
    assert private is not None  # read_key_file(secret=True) raised otherwise
    return public, private


def _write(path: str, what: str, public: bytes, secret: bytes | None) -> None:
    warning = "; KEEP IT SECRET" if secret else ""
    text = _BANNER.format(what=what, when=dt.datetime.now().isoformat(timespec="seconds"),
                          warning=warning)
    text += f'curve\n    public-key = "{public.decode()}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode()}"\n'
    # Why os.open with a mode: the secret must never exist readable by others, not
    # even between the write and a later chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def check_name(name: str) -> str:
    """``name`` if it can name a key file, else ValueError saying why."""
    if not _NAME.match(name) or name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)):
        raise ValueError(f"bad key name {name!r}: use letters, digits and _.@- "
                         f"(no suffix, no '/')")
    return name


def new_key_pair(directory: str, name: str) -> tuple[str, str]:
    """Make ``<directory>/<name>.key`` and ``<name>.key_secret``; their paths.

    Refuses (FileExistsError) to overwrite an existing key.
    """
    check_name(name)
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    sec_path = os.path.join(directory, name + SECRET_SUFFIX)
    for p in (pub_path, sec_path):
        if os.path.exists(p):
            raise FileExistsError(f"{p}: already exists; not overwriting a key")
    _write(sec_path, "secret", public, secret)
    _write(pub_path, "public", public, None)
    return pub_path, sec_path


def authorize(key_file: str, directory: str, name: str | None = None) -> str:
    """Copy the public half of ``key_file`` into ``directory`` as ``<name>.key``.

    ``name`` defaults to the file's name without suffix.  A secret file is accepted
    and only its public key is copied.  Returns the new file's path.
    """
    public, _ = read_key_file(key_file)
    base = os.path.basename(key_file)
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = check_name(name or base)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + PUBLIC_SUFFIX)
    if os.path.exists(path):
        raise FileExistsError(f"{path}: already exists; revoke it first or choose --name")
    if public in authorized_keys(directory).values():
        raise FileExistsError(f"{directory}: this key is already authorised")
    _write(path, "public (authorised client)", public, None)
    return path


def authorized_keys(directory: str) -> dict[str, bytes]:
    """{file name: public key} of every valid ``*.key`` in ``directory``.

    A file that holds no valid key is skipped (the caller may list it with
    :func:`invalid_files`): one bad file must not lock every client out.
    """
    out = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*" + PUBLIC_SUFFIX))):
        try:
            out[os.path.basename(path)] = read_key_file(path)[0]
        except KeyFileError:
            continue
    return out


def invalid_files(directory: str) -> list[str]:
    """The ``*.key`` files of ``directory`` that hold no valid public key."""
    bad = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*" + PUBLIC_SUFFIX))):
        try:
            read_key_file(path)
        except KeyFileError:
            bad.append(path)
    return bad


def revoke(directory: str, name: str) -> str:
    """Remove ``<name>.key`` from the authorised directory; its path."""
    path = os.path.join(directory, check_name(name) + PUBLIC_SUFFIX)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such authorised key") from None
    return path


def directory_state(directory: str) -> tuple:
    """Something that changes whenever a key file is added, removed or rewritten."""
    try:
        st = os.stat(directory)
        names = sorted(n for n in os.listdir(directory) if n.endswith(PUBLIC_SUFFIX))
    except OSError:
        return ()
    files = []
    for n in names:
        try:
            s = os.stat(os.path.join(directory, n))
            files.append((n, s.st_mtime_ns, s.st_size, s.st_ino))
        except OSError:
            continue
    return (st.st_mtime_ns, tuple(files))
