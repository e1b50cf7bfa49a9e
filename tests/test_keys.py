"""Keys derived from the run secret (pccl_py.wire.keys)."""

import os

import zmq

from pccl_py.wire import keys


def test_every_use_and_secret_gets_its_own_key():
    a = keys.derive(b"s", "one")
    assert len(a) == 32 and a == keys.derive(b"s", "one")
    assert a != keys.derive(b"s", "two") and a != keys.derive(b"t", "one")
    assert keys.derive(b"s", "one", salt=b"x") != a


def test_curve_pairs_are_valid_and_differ_by_role_and_secret():
    pub, sec = keys.curve_keypair(b"secret", "coordinator")
    assert len(pub) == 40 and len(sec) == 40 and zmq.curve_public(sec) == pub
    assert keys.curve_keypair(b"secret", "member")[0] != pub
    assert keys.curve_keypair(b"other", "coordinator")[0] != pub


def test_link_keys_depend_on_both_nonces_and_differ_per_direction():
    na, nc = os.urandom(32), os.urandom(32)
    c2a, a2c = keys.link_keys(b"s", na, nc, "c", "a", 0, 1)
    assert c2a != a2c and len(c2a) == len(a2c) == keys.LINK_KEY_BYTES
    assert keys.link_keys(b"s", na, nc, "c", "a", 0, 1) == (c2a, a2c)
    assert keys.link_keys(b"s", os.urandom(32), nc, "c", "a", 0, 1)[0] != c2a
    assert keys.link_keys(b"s", na, os.urandom(32), "c", "a", 0, 1)[0] != c2a
    assert keys.link_keys(b"s", na, nc, "c", "a", 1, 1)[0] != c2a
    assert keys.transfer_keys(b"s", na, nc, "c", "a")[0] != c2a
