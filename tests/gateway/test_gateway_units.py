"""Unit tests of the gateway's pure parts: config validation, balancers, affinity keys, complexity routing,
token buckets, the autoscaler's decision and its /metrics parsing.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from tokenmill.gateway.auth import KeyAuth, TokenBucket
from tokenmill.gateway.autoscaler import decide, parse_load
from tokenmill.gateway.balancer import ConsistentHash, LeastOutstanding, PowerOfTwo, affinity_key
from tokenmill.gateway.complexity import HeuristicScorer, load_scorer
from tokenmill.gateway.config import AutoscaleConfig, GatewayConfigError, KeyConfig, load_config, parse_config
from tokenmill.gateway.replica import Replica, ReplicaState
from tokenmill.gateway.router import Router, UnknownModelError

BASE = {
    "models": [
        {"name": "small", "kind": "external", "urls": ["http://127.0.0.1:1"]},
        {
            "name": "big",
            "kind": "managed",
            "model": "/m/big",
            "replicas": 1,
            "autoscale": {"min_replicas": 0, "max_replicas": 3},
        },
    ],  # fmt: skip
    "aliases": {"gpt-4o-mini": "small"},
    "virtual_models": [{"name": "auto", "fast": "small", "strong": "big"}],
}


def with_changes(**changes) -> dict:
    return {**BASE, **changes}


def test_a_valid_config_loads_from_yaml(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "models:\n  - {name: small, kind: external, urls: ['http://127.0.0.1:1']}\naliases: {gpt: small}\n"
    )
    config = load_config(path)
    assert config.pool("small").served_name == "small" and config.aliases == {"gpt": "small"}
    assert config.models[0].balancer == "least_outstanding"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (with_changes(aliases={"x": "missing"}), "aliases.x points at 'missing'"),
        (with_changes(models=[{"name": "a", "kind": "managed"}]), "a managed pool needs 'model'"),
        (with_changes(models=[{"name": "a", "kind": "external", "urls": []}]), "needs at least one URL"),
        (with_changes(models=[{"name": "a", "kind": "external", "urls": ["ftp://x"]}]), "must start with http"),
        (with_changes(models=[{"name": "a", "kind": "external", "urls": ["http://x"], "balncer": "p2c"}]),
         "models.0.balncer: Extra inputs are not permitted"),
        (with_changes(models=[{"name": "a", "kind": "managed", "model": "m", "replicas": 5,
                               "autoscale": {"max_replicas": 2}}]), "replicas (5) must be between"),
        (with_changes(models=[{"name": "a", "kind": "managed", "model": "m",
                               "autoscale": {"min_replicas": 3, "max_replicas": 2}}]),
         "min_replicas (3) must be <= max_replicas (2)"),
        (with_changes(virtual_models=[{"name": "auto", "fast": "small", "strong": "nope"}]), "strong 'nope'"),
        (with_changes(aliases={"small": "big"}), "not two of them: ['small']"),
        ({"models": []}, "models: List should have at least 1 item"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(data, fragment):
    with pytest.raises(GatewayConfigError) as err:
        parse_config(data)
    assert fragment in str(err.value)


def test_unreadable_and_invalid_yaml_give_clear_errors(tmp_path):
    with pytest.raises(GatewayConfigError, match="cannot read gateway config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(GatewayConfigError, match="is not valid YAML"):
        load_config(bad)


def replicas(n: int, outstanding: list[int] | None = None) -> list[Replica]:
    reps = [Replica(slot=f"r{i}", url=f"http://h{i}", state=ReplicaState.READY) for i in range(n)]
    for rep, out in zip(reps, outstanding or [0] * n, strict=True):
        rep.outstanding = out
    return reps


def test_least_outstanding_picks_the_idlest_ready_replica():
    reps = replicas(3, [5, 1, 2])
    assert LeastOutstanding().choose(reps).slot == "r1"
    reps[1].state = ReplicaState.EJECTED
    assert LeastOutstanding().choose(reps).slot == "r2"
    for r in reps:
        r.state = ReplicaState.STARTING
    assert LeastOutstanding().choose(reps) is None


def test_power_of_two_never_picks_the_busiest_of_its_pair():
    reps = replicas(3, [9, 0, 0])
    balancer = PowerOfTwo(random.Random(0))
    picks = Counter(balancer.choose(reps).slot for _ in range(300))
    assert picks["r0"] == 0 and picks["r1"] > 0 and picks["r2"] > 0


def test_consistent_hash_is_sticky_and_moves_only_a_lost_replicas_keys():
    reps = replicas(4)
    balancer = ConsistentHash()
    keys = [f"session:{i}" for i in range(400)]
    before = {k: balancer.choose(reps, k).slot for k in keys}
    assert before == {k: balancer.choose(reps, k).slot for k in keys}  # sticky
    assert len(set(before.values())) == 4  # and spread
    reps[2].state = ReplicaState.EJECTED
    after = {k: balancer.choose(reps, k).slot for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "r2"}


def test_affinity_key_prefers_session_then_prompt_prefix():
    assert affinity_key({"prompt": "abc"}, "s1", 10) == "session:s1"
    assert affinity_key({"prompt": "abcdefghijkl"}, None, 4) == "prefix:abcd"
    chat = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]}
    assert affinity_key(chat, None, 8) == "prefix:You are "
    assert affinity_key({}, None, 8) is None


def test_router_resolves_names_aliases_and_auto():
    router = Router(parse_config(BASE))
    assert router.resolve({"model": "big"}).reason == "direct"
    assert router.resolve({"model": "gpt-4o-mini"}).model == "small"
    easy = router.resolve({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert (easy.model, easy.reason) == ("small", "auto:fast")
    hard = router.resolve({"model": "auto", "prompt": "Please prove this theorem."})
    assert (hard.model, hard.reason) == ("big", "auto:strong") and hard.score >= 0.5
    long = router.resolve({"model": "auto", "prompt": "x " * 1500})
    assert long.model == "big"
    deep = [{"role": r, "content": "ok"} for _ in range(10) for r in ("user", "assistant")]
    assert router.resolve({"model": "auto", "messages": deep}).model == "small"  # depth alone stays below 0.5
    with pytest.raises(UnknownModelError, match="this gateway serves: small, big, gpt-4o-mini, auto"):
        router.resolve({"model": "gpt-5"})


def test_heuristic_scorer_parts_and_plugins():
    scorer = HeuristicScorer(length_scale_chars=100, depth_scale=2, keywords=["sql"])
    assert scorer.score({"prompt": "x" * 50}) == pytest.approx(0.5 * 0.5 + 0.3 * 0.5)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "write SQL"}]}]}
    assert scorer.score(parts) >= 0.5
    plugged = load_scorer("tokenmill.gateway.complexity:HeuristicScorer", {"keywords": ["zzz"]})
    assert plugged.score({"prompt": "zzz"}) >= 0.5
    with pytest.raises(ValueError, match="scorer must be 'heuristic' or 'package.module:name'"):
        load_scorer("nonsense", {})
    with pytest.raises(ValueError, match="scorer 'no_such_module:x' cannot be loaded"):
        load_scorer("no_such_module:x", {})
    with pytest.raises(ValueError, match="length_scale_chars must be >= 1"):
        load_scorer("heuristic", {"length_scale_chars": 0})


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, capacity=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0.0


def test_key_auth_statuses():
    now = [0.0]
    auth = KeyAuth([KeyConfig(name="a", key="k1", rate_limit_rps=1, burst=1), KeyConfig(name="b", key="k2")],
                   clock=lambda: now[0])  # fmt: skip
    assert auth.check(None).status == 401
    assert auth.check("Bearer wrong").status == 401
    assert auth.check("Bearer k1").status == 200
    limited = auth.check("Bearer k1")
    assert limited.status == 429 and limited.retry_after_s == 1
    assert auth.check("Bearer k2").status == 200
    assert KeyAuth([]).check(None).status == 200


def test_autoscaler_decisions():
    cfg = AutoscaleConfig(min_replicas=0, max_replicas=3, target_load_per_replica=4, scale_up_cooldown_s=10,
                          scale_down_cooldown_s=30, idle_timeout_s=60)  # fmt: skip
    assert decide(cfg, current=1, load=9, idle_s=0, since_scale_s=20).desired == 3  # ceil(9/4)
    assert decide(cfg, current=1, load=100, idle_s=0, since_scale_s=20).desired == 3  # capped at max
    assert decide(cfg, current=1, load=9, idle_s=0, since_scale_s=5).reason == "cooldown"
    assert decide(cfg, current=3, load=4, idle_s=0, since_scale_s=40).desired == 1
    assert decide(cfg, current=3, load=4, idle_s=0, since_scale_s=20).reason == "cooldown"
    # Stabilization: a recent busier recommendation holds a scale-down back (or limits how far it goes).
    assert decide(cfg, current=3, load=4, idle_s=0, since_scale_s=40, window_max=3).reason == "stabilizing"
    assert decide(cfg, current=3, load=4, idle_s=0, since_scale_s=40, window_max=2).desired == 2
    assert decide(cfg, current=2, load=0, idle_s=10, since_scale_s=100).desired == 2  # not idle long enough
    idle = decide(cfg, current=2, load=0, idle_s=61, since_scale_s=100)
    assert (idle.desired, idle.reason) == (0, "idle")  # scale to zero
    floor = AutoscaleConfig(min_replicas=1, max_replicas=3, idle_timeout_s=60, scale_down_cooldown_s=0)
    assert decide(floor, current=2, load=0, idle_s=61, since_scale_s=100).desired == 1


def test_parse_load_sums_waiting_and_running():
    text = (
        "# TYPE tokenmill:num_requests_running gauge\n"
        'tokenmill:num_requests_running{model_name="a"} 3.0\n'
        "# TYPE tokenmill:num_requests_waiting gauge\n"
        'tokenmill:num_requests_waiting{model_name="a"} 5.0\n'
        "# TYPE tokenmill:kv_cache_usage_perc gauge\n"
        'tokenmill:kv_cache_usage_perc{model_name="a"} 0.5\n'
    )
    assert parse_load(text) == 8.0


def test_cli_refuses_a_bad_config_with_the_field_named(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "gateway.yaml"
    bad.write_text("models:\n  - {name: a, kind: managed, replicas: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "gateway", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "models.0: pool 'a': a managed pool needs 'model'" in proc.stderr


def test_relay_forwards_whole_sse_events_for_both_line_endings():
    from tokenmill.gateway.proxy import MAX_PENDING_BYTES, complete_events_end

    assert complete_events_end(b"data: a\n\ndata: b") == len(b"data: a\n\n")
    assert complete_events_end(b"data: a\r\n\r\ndata: b\r\n\r\n") == len(b"data: a\r\n\r\ndata: b\r\n\r\n")
    assert complete_events_end(b"data: half an ev") == 0
    # Not SSE after all: released once past the cap instead of held to the end.
    assert complete_events_end(b"x" * (MAX_PENDING_BYTES + 1)) == MAX_PENDING_BYTES + 1


def test_the_example_config_in_the_docs_is_valid():
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "GATEWAY.md").read_text()
    block = re.search(r"```yaml\n# gateway.yaml\n(.*?)```", docs, re.DOTALL).group(1)
    config = parse_config(yaml.safe_load(block), "docs/GATEWAY.md")
    assert [p.name for p in config.models] == ["fast", "strong"]
    Router(config)  # its virtual model and scorer load
