"""Fleet scrape target groups read back from etcd: only what a supervisor writes passes."""

from __future__ import annotations

from dynamo_vllm.contract.discovery.target_groups import group_problem, valid_groups

GOOD = {"targets": ["gpu09.example:9400"],
        "labels": {"node": "gpu09", "dynamo_vllm_instance": "llama",
                   "__meta_dynamo_vllm_model": "llama", "__meta_dynamo_vllm_workers": "8"}}


def test_what_a_supervisor_publishes_passes() -> None:
    assert group_problem(GOOD) is None
    assert group_problem({"targets": ["[fd00::1]:9400"]}) is None


def test_planted_groups_are_refused() -> None:
    for bad, problem in (
        ({**GOOD, "labels": {"__metrics_path__": "/x"}}, "reserved"),
        ({**GOOD, "labels": {"__scheme__": "https"}}, "reserved"),
        ({**GOOD, "labels": {"__param_target": "evil"}}, "reserved"),
        ({**GOOD, "labels": {"__address__": "evil:80"}}, "reserved"),
        ({**GOOD, "labels": {"bad-name": "x"}}, "not a label name"),
        ({**GOOD, "labels": {"node": 3}}, "must be a string"),
        ({"targets": ["http://evil/x"]}, "not host:port"),
        ({"targets": ["evil:99999"]}, "not host:port"),
        ({"targets": []}, "1 to 16"),
        ({"targets": ["a:1"] * 17}, "1 to 16"),
        ({"targets": ["a:1"], "extra": 1}, "not a target group"),
        (["a:1"], "not a target group"),
    ):
        found = group_problem(bad)
        assert found is not None and problem in found, (bad, found)
    assert valid_groups([GOOD, {"targets": ["x:1"], "labels": {"__scheme__": "h"}}]) == [GOOD]
