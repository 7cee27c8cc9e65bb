"""Helpers of the security tests: a set of CURVE keys and the config sections using them."""
from __future__ import annotations

import os
from types import SimpleNamespace

from zarkov import keyfiles as K
from zarkov.security import ClientKeys


def make_keys(directory: str) -> SimpleNamespace:
    """The servers' key pair, an authorised directory with 'app' and 'worker', and an
    'intruder' key that is not authorised.  Attributes: paths, ``secret[name]`` (the
    clients' secret key files) and one ClientKeys per client name."""
    server_public, server_secret = K.new_key_pair(directory, "server")
    authorized = os.path.join(directory, "authorized")
    out = SimpleNamespace(dir=directory, server_public=server_public,
                          server_secret=server_secret, authorized=authorized, secret={})
    os.makedirs(authorized)
    for name in ("app", "worker", "intruder"):
        public, secret = K.new_key_pair(os.path.join(directory, "clients"), name)
        if name != "intruder":
            K.authorize(public, authorized)
        out.secret[name] = secret
        setattr(out, name, ClientKeys.load(server_public, secret))
    return out


def server_section(keys: SimpleNamespace) -> dict:
    """The security section of a host that runs servers."""
    return {"server_key": keys.server_secret, "authorized_keys": keys.authorized}


def client_section(keys: SimpleNamespace, name: str) -> dict:
    """The security section of a host that only connects, as client ``name``."""
    return {"server_public_key": keys.server_public, "client_key": keys.secret[name]}
