"""Parsing /generate answers into samples; malformed answers name the server and field."""

from __future__ import annotations

import pytest

from oprd_mega.rollout.samples import MalformedResponseError, Sample, parse_generate_output

GOOD = {
    "text": "",
    "output_ids": [4, 5, 2],
    "meta_info": {
        "finish_reason": {"type": "stop", "matched": 2},
        "output_token_logprobs": [[-0.1, 4, None], [-1.5, 5, "x"], [-0.01, 2, None]],
        "weight_version": "step-3",
    },
}


def test_parse_good_answer():
    s = parse_generate_output(GOOD, [1, 2, 3], group_id=7, index=1, server="http://s:1")
    assert s == Sample(
        (1, 2, 3), (4, 5, 2), (-0.1, -1.5, -0.01), "stop", "step-3", 7, 1, "http://s:1"
    )
    assert s.total_length == 6 and s.token_ids == (1, 2, 3, 4, 5, 2)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda a: a.pop("output_ids"), "missing field 'output_ids'"),
        (lambda a: a.pop("meta_info"), "missing field 'meta_info'"),
        (lambda a: a["meta_info"]["output_token_logprobs"].pop(), "2 entries for 3 output_ids"),
        (lambda a: a["meta_info"]["output_token_logprobs"][1].__setitem__(1, 9), "is for token 9"),
        (lambda a: a["meta_info"]["output_token_logprobs"][0].__setitem__(0, 0.5), "not <= 0"),
        (lambda a: a["meta_info"].__setitem__("finish_reason", {"type": "eos"}), "finish_reason"),
        (lambda a: a.__setitem__("output_ids", [4, "5", 2]), "list of integers"),
    ],
)
def test_malformed_answers(mutate, needle):
    import copy

    answer = copy.deepcopy(GOOD)
    mutate(answer)
    with pytest.raises(MalformedResponseError, match="http://s:1") as info:
        parse_generate_output(answer, [1], group_id=0, index=0, server="http://s:1")
    assert needle in str(info.value)


def test_require_weight_version_names_stale_servers():
    from oprd_mega.rollout.samples import StaleRolloutError, require_weight_version

    def sample(version, server):
        return Sample((1,), (2,), (-0.1,), "length", version, 0, 0, server)

    fresh = [sample("v2", "http://a"), sample("v2", "http://b")]
    require_weight_version(fresh, "v2")
    with pytest.raises(StaleRolloutError, match=r"2 of 3 samples .* 2 from http://b at 'v1'"):
        require_weight_version(
            [*fresh[:1], sample("v1", "http://b"), sample("v1", "http://b")], "v2"
        )
