"""The fleet's pure logic: routing choices, the completions request it sends, reading the answer
back, and the settings it refuses. Real servers are in test_fleet.py."""

from __future__ import annotations

import time

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from lorag.config import ConfigError, Settings, load_settings
from lorag.fleet.routing import Picker, ServerState
from lorag.fleet.settings import FleetServer
from lorag.fleet.translate import chunk_output, completion_body


def servers(*loads: int, adapters: set[str] | None = None) -> list[ServerState]:
    found = []
    for i, load in enumerate(loads):
        state = ServerState(f"s{i}", up=True, ready=True, in_flight=load, hot_slots=2)
        state.loaded = set(adapters or {"a", "b", "c", *(f"adapter-{i}" for i in range(3000))})
        found.append(state)
    return found


def test_an_adapter_goes_home_while_home_is_within_the_slack() -> None:
    picker = Picker("least_loaded", affinity_slack=2)
    fleet = servers(0, 0)
    home = picker.pick(fleet, "a")
    assert home is not None and all(picker.pick(fleet, "a") is home for _ in range(5))  # stable
    other = next(s for s in fleet if s is not home)
    home.in_flight = 2
    assert picker.pick(fleet, "a") is home  # 2 more in flight: within the slack
    home.in_flight = 3
    assert picker.pick(fleet, "a") is other  # too far behind: a hot spot is not worth it
    assert picker.pick(fleet, None) is other  # base requests: the least loaded


def test_homes_spread_over_the_servers_by_weight() -> None:
    picker = Picker("least_loaded", affinity_slack=100)
    fleet = servers(0, 0, 0)
    fleet[2].weight = 2.0
    homes = [picker.pick(fleet, f"adapter-{i}").name for i in range(3000)]  # unassigned: rendezvous alone
    shares = {name: homes.count(name) / len(homes) for name in ("s0", "s1", "s2")}
    assert abs(shares["s0"] - 0.25) < 0.04 and abs(shares["s1"] - 0.25) < 0.04 and abs(shares["s2"] - 0.5) < 0.04
    few = ["a", "b", "c", "adapter-1"]
    picker.assign(few, fleet)  # bounded loads: a few adapters split by weight, not by luck
    assert sorted(picker.homes.values()) == ["s0", "s1", "s2", "s2"]
    assert [picker.pick(fleet, a).name for a in few] == [picker.homes[a] for a in few]
    before = dict(picker.homes)
    picker.assign([*few, "adapter-2"], fleet)
    assert {a: picker.homes[a] for a in few} == before  # a new adapter moves no old one


def test_every_replica_gives_an_adapter_the_same_home() -> None:
    """Replicas share no routing state: homes depend only on the adapter set and the server list
    (rendezvous hashing), so lorags in front of one fleet send an adapter to the same server."""
    adapters = ["a", "b", "c", *(f"adapter-{i}" for i in range(40))]
    replicas = [Picker("least_loaded", affinity_slack=2) for _ in range(3)]
    for turn, picker in enumerate(replicas):
        fleet = servers(0, 0, 0, 0)
        fleet[3].weight = 2.0
        order = fleet[turn:] + fleet[:turn]  # each replica lists (and learned of) the servers in its own order
        picker.assign(list(reversed(adapters)) if turn % 2 else adapters, order)
    assert replicas[0].homes == replicas[1].homes == replicas[2].homes and len(replicas[0].homes) == len(adapters)


def test_weights_divide_the_load() -> None:
    fleet = servers(4, 2)
    fleet[0].weight = 4.0  # four times the capacity: 4 in flight is a load of 1
    assert Picker("least_loaded", 0).pick(fleet, None).name == "s0"


def test_only_servers_that_are_up_ready_rested_and_hold_the_adapter() -> None:
    picker = Picker("least_loaded", 2)
    fleet = servers(0, 5, 9)
    fleet[0].refused["a"] = "no such path"
    fleet[1].failed("reset by peer", backoff_s=30, max_backoff_s=60)
    assert picker.pick(fleet, "a").name == "s2"
    assert picker.pick(fleet, "a", exclude={"s2"}) is None
    assert picker.pick(fleet, "zzz") is None
    fleet[2].ready = False  # up but not reconciled yet
    assert picker.pick(fleet, "a") is None


def test_round_robin_takes_turns() -> None:
    picker = Picker("round_robin", 0)
    fleet = servers(0, 0, 0)
    assert [picker.pick(fleet, "a").name for _ in range(4)] == ["s0", "s1", "s2", "s0"]


def test_backoff_doubles_while_failures_continue() -> None:
    state = ServerState("s", up=True, ready=True)
    state.failed("x", backoff_s=1, max_backoff_s=3)
    first = state.resting_until
    state.failed("x", backoff_s=1, max_backoff_s=3)
    state.failed("x", backoff_s=1, max_backoff_s=3)
    assert state.resting_until - first >= 1.5
    state.succeeded()
    assert state.failures == 0 and state.resting_until == 0


def test_hot_set_counts_the_adapter_swaps_a_server_would_make() -> None:
    state = ServerState("s", hot_slots=2)
    for adapter in ["a", "b", "a", "c", "a", "b", None]:
        state.served(adapter)
    assert state.adapter_loads == 4 and list(state.hot) == ["a", "b"] and state.requests == 7


def test_the_completions_body_samples_like_the_params() -> None:
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, seed=3, max_tokens=9, stop=["\n\n"],
                            logprobs=2, presence_penalty=0.5, output_kind=RequestOutputKind.DELTA,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    body = completion_body("legal@v2", [1, 2, 3], params, "req-1")
    assert body["model"] == "legal@v2" and body["prompt"] == [1, 2, 3] and body["stream"] is True
    assert {k: body[k] for k in ("n", "temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "logprobs",
                                 "presence_penalty")} == {
        "n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3, "max_tokens": 9, "stop": ["\n\n"],
        "logprobs": 2, "presence_penalty": 0.5}
    assert body["structured_outputs"] == {"choice": ["yes", "no"]}
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"] and "stream_interval" not in body
    assert completion_body("m", [1], params, "req-2", stream_interval=4)["stream_interval"] == 4


def test_a_chunk_reads_back_as_a_request_output() -> None:
    chunk = {"choices": [{"index": 1, "text": " cent", "token_ids": [430], "finish_reason": "length",
                          "logprobs": {"tokens": ["token_id:430"], "token_logprobs": [-1.5],
                                       "top_logprobs": [{"token_id:430": -1.5, "token_id:7": -0.5}]}}]}
    (completion,) = chunk_output(chunk).outputs
    assert completion.index == 1 and completion.text == " cent" and completion.token_ids == [430]
    assert completion.finished() and completion.finish_reason == "length"
    assert {k: v.logprob for k, v in completion.logprobs[0].items()} == {430: -1.5, 7: -0.5}


def test_server_settings_name_what_is_wrong(tmp_path) -> None:
    def load(text: str) -> Settings:
        path = tmp_path / "lorag.toml"
        path.write_text(text)
        return load_settings(path)

    with pytest.raises(ConfigError, match="needs at least one"):
        load('[engine]\nbackend = "remote"\n')
    with pytest.raises(ConfigError, match="url"):
        load('[engine]\nbackend = "remote"\n[[engine.servers]]\nurl = "localhost:8000"\n')
    with pytest.raises(ConfigError, match="used twice"):
        load('[engine]\nbackend = "remote"\n[[engine.servers]]\nurl = "http://a:1"\n'
             '[[engine.servers]]\nurl = "http://b:1"\nname = "a:1"\n')
    settings = load('[engine]\nbackend = "remote"\n[[engine.servers]]\nurl = "http://10.0.0.5:8000/v1/"\n')
    assert settings.engine.servers[0].url == "http://10.0.0.5:8000" and settings.engine.servers[0].label == "10.0.0.5:8000"


def test_path_map_longest_prefix_wins() -> None:
    server = FleetServer(url="http://a:1", path_map={"/srv": "/mnt", "/srv/lorag/state": "/data/state"})
    assert server.server_path("/srv/lorag/state/adapters/x") == "/data/state/adapters/x"
    assert server.server_path("/srv/other") == "/mnt/other"
    assert server.server_path("/srvx/other") == "/srvx/other"
    assert server.server_path("/elsewhere") == "/elsewhere"


def test_a_restarted_server_is_not_held_to_its_old_back_off() -> None:
    picker = Picker("least_loaded", 2)
    fleet = servers(0, 0)
    for _ in range(6):  # a kill -9 under load: every request in flight on it failed
        fleet[0].failed("connection refused", backoff_s=1, max_backoff_s=30)
    fleet[0].went_away("connection refused")  # /health unanswered while it restarts
    fleet[0].came_back()
    fleet[0].ready = True  # reconciled
    assert fleet[0].resting_s(time.monotonic()) == 0 and fleet[0].failures == 0
    assert picker.pick(fleet, None).name == "s0"
    # Requests failing while /health still answers: the back-off stands.
    fleet[1].failed("500", backoff_s=30, max_backoff_s=60)
    fleet[1].up = fleet[1].ready = False
    fleet[1].came_back()
    fleet[1].ready = True
    assert fleet[1].resting_s(time.monotonic()) > 0
    assert picker.pick(fleet, None, exclude={"s0"}) is None
