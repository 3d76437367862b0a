"""file:///dir origin against a real temporary directory tree."""

from __future__ import annotations

import os

import pytest

from appliance.cache.errors import InvalidRequest, KeyNotFound, OriginError
from appliance.config import GroupSettings
from appliance.origins import build_origin


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello")
    (root / "sub" / "deeper" / "x.bin").write_bytes(b"\x00\xffbin")
    (root / "张三.txt").write_text("中文", encoding="utf-8")
    (root / "big.bin").write_bytes(b"z" * 101)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "escape-link")  # points outside: refused
    os.symlink(tmp_path, root / "escape-dir")  # a directory outside: refused
    os.symlink(root / "sub" / "deeper" / "x.bin", root / "inside-link")  # stays inside: allowed
    os.symlink("sub", root / "sub-link")  # relative, stays inside
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture
async def origin(tree, tmp_path):
    spec = GroupSettings(origin=f"file://{tree}", timeout=2.0)
    o = build_origin("files", spec, state_dir=tmp_path, max_value_bytes=100)
    yield o
    await o.close()


async def test_reads_files(origin):
    assert await origin.load("hello.txt") == b"hello"
    assert await origin.load("sub/deeper/x.bin") == b"\x00\xffbin"
    assert await origin.load("张三.txt") == "中文".encode()
    assert await origin.load("./hello.txt") == b"hello"


async def test_symlinks_inside_are_followed(origin):
    assert await origin.load("inside-link") == b"\x00\xffbin"
    assert await origin.load("sub-link/deeper/x.bin") == b"\x00\xffbin"


@pytest.mark.parametrize("key", ["nope.txt", "sub/nope", "hello.txt/child", "sub", "sub/deeper", "", "fifo"])
async def test_missing_directory_or_special_is_not_found(origin, key):
    with pytest.raises(KeyNotFound):
        await origin.load(key)


@pytest.mark.parametrize(
    "key",
    [
        "../secret.txt",
        "../../etc/passwd",
        "sub/../../secret.txt",
        "sub/../hello.txt",  # harmless, but '..' is refused outright
        "..",
        "/etc/passwd",
        "/" + "hello.txt",
        "hello.txt\x00.png",
        "escape-link",
        "escape-dir/secret.txt",
        "sub-link/../../secret.txt",
    ],
)
async def test_escapes_are_refused(origin, key):
    with pytest.raises(InvalidRequest):
        await origin.load(key)


async def test_file_larger_than_limit(origin):
    with pytest.raises(OriginError, match="larger than 100 bytes"):
        await origin.load("big.bin")


async def test_state_dir_placeholder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "k").write_bytes(b"v")
    spec = GroupSettings(origin="file://{state_dir}/data")
    o = build_origin("files", spec, state_dir=tmp_path, max_value_bytes=100)
    try:
        assert await o.load("k") == b"v"
    finally:
        await o.close()
