"""The Responses API's request parsing, output items and events, and the bounded response store."""

import pytest

from helexa_native.openai_protocol import ApiError
from helexa_native.responses_protocol import (
    ResponseBuilder,
    input_messages,
    output_messages,
    parse_responses_request,
    response_usage,
)
from helexa_native.server.response_store import ResponseStore


def test_request_becomes_chat_parts():
    req = parse_responses_request(
        {
            "model": "m",
            "instructions": "Be brief.",
            "max_output_tokens": 9,
            "temperature": 0.5,
            "input": [
                {"role": "developer", "content": "dev"},
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": '{"a": 1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}},
        }
    )
    assert req.sampling == {"temperature": 0.5, "max_tokens": 9}
    assert [m["role"] for m in req.input_messages] == ["system", "user", "assistant", "tool"]
    assert [c["id"] for c in req.input_messages[2]["tool_calls"]] == ["c1", "c2"]
    assert req.input_messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "one"}
    assert req.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert req.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert req.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
    }
    assert req.echo["instructions"] == "Be brief." and req.echo["max_output_tokens"] == 9


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_requests_name_their_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_responses_request(body)
    assert e.value.status == 400 and e.value.param == param


def test_previous_response_allows_empty_input():
    assert input_messages(None, allow_empty=True) == []


def _types(events):
    return [e["type"] for e in events]


def test_builder_events_and_output():
    b = ResponseBuilder("resp_1", "m", {"tools": []}, created=7)
    ev = b.start()
    ev += b.feed([{"reasoning_content": "think"}, {"content": "Hel"}])
    ev += b.feed(
        [
            {"content": "lo"},
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
                ]
            },
        ]
    )
    ev += b.feed([{"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}])
    ev += b.finish(
        "tool_calls", response_usage({"prompt_tokens": 3, "completion_tokens": 4, "reasoning_tokens": 1}, cached=2)
    )
    assert [e["sequence_number"] for e in ev] == list(range(len(ev)))
    assert _types(ev) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    resp = ev[-1]["response"]
    assert resp["status"] == "completed" and resp["created_at"] == 7
    kinds = [o["type"] for o in resp["output"]]
    assert kinds == ["reasoning", "message", "function_call"]
    assert resp["output"][1]["content"][0]["text"] == "Hello"
    assert resp["output"][2]["call_id"] == "call_a" and resp["output"][2]["arguments"] == "{}"
    assert resp["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 7,
    }
    assert output_messages(resp["output"]) == [
        {
            "role": "assistant",
            "content": "Hello",
            "reasoning_content": "think",
            "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        }
    ]


def test_builder_marks_a_cut_answer_incomplete():
    b = ResponseBuilder("resp_2", "m", {})
    b.start()
    b.feed([{"content": "abc"}])
    ev = b.finish("length", response_usage({}))
    assert ev[-1]["type"] == "response.incomplete"
    assert ev[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert ev[-2]["item"]["status"] == "incomplete"


def test_store_is_a_bounded_lru():
    s = ResponseStore(2)
    s.put("a", {"id": "a"}, [])
    s.put("b", {"id": "b"}, [])
    assert s.get("a").response == {"id": "a"}  # a is now the most recent
    s.put("c", {"id": "c"}, [])
    assert s.get("b") is None and s.get("a") is not None and len(s) == 2
    assert s.delete("a") and not s.delete("a")
    none = ResponseStore(0)
    none.put("x", {}, [])
    assert none.get("x") is None
    with pytest.raises(ValueError):
        ResponseStore(-1)
