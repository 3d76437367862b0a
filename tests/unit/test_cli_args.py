"""The CLI's global options: before the command or after it; after wins."""

from __future__ import annotations

import pytest

from appliance.cli import ROUTED, parse_args


@pytest.mark.parametrize(
    "argv, config, peers",
    [
        (["--config", "a.toml", "get", "scores", "张三"], "a.toml", None),
        (["get", "scores", "张三", "--config", "b.toml"], "b.toml", None),
        (["--config", "a.toml", "get", "--config", "b.toml", "scores", "张三"], "b.toml", None),
        (["--peers", "h:1", "get", "scores", "张三"], None, "h:1"),
        (["--peers", "h:1", "get", "--peers", "h:2", "scores", "张三"], None, "h:2"),
        (["get", "scores", "张三"], None, None),
    ],
)
def test_global_options_before_or_after_the_command(argv, config, peers):
    args = parse_args(argv)
    assert (args.config, args.peers, args.group, args.key) == (config, peers, "scores", "张三")


def test_every_routed_command_takes_peers_and_config():
    extra = {"get": ["g", "k"], "set": ["g", "k", "v"], "remove": ["g", "k"], "peers": [], "locate": ["k"]}
    for command in ROUTED:
        args = parse_args(["--config", "c.toml", "--peers", "h:1", command, *extra[command]])
        assert (args.config, args.peers) == ("c.toml", "h:1")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--peers", "h:1", "stats"], "--peers applies only to get, set, remove, peers, locate, not to stats"),
        (["--peers", "h:1", "run"], "not to run"),
        (["--config", "c.toml", "systemd", "install"], "--config does not apply to systemd"),
        (["stats", "--peers", "h:1"], "unrecognized arguments"),
    ],
)
def test_a_global_option_where_it_does_not_apply_exits_2(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err
