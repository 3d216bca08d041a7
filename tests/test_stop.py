"""The streaming stop-string matcher."""

import random

from helexa_native.stop import StopMatcher, truncate_at_stop


def stream(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.push(p))
        if m.stopped:
            break
    tail = m.flush()
    return "".join(out) + tail, m.matched, out


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert m.push("abc") == "abc" and m.flush() == ""


def test_stop_split_across_deltas_is_never_emitted():
    text, matched, parts = stream(["</end>"], ["Hello <", "/e", "nd", "> tail"])
    assert text == "Hello " and matched == "</end>"
    assert all("<" not in p for p in parts)


def test_held_prefix_released_when_it_turns_out_not_to_be_a_stop():
    m = StopMatcher(["STOP"])
    assert m.push("ab ST") == "ab "
    assert m.held == "ST"
    assert m.push("ART") == "START"
    assert m.flush() == ""
    assert not m.stopped


def test_flush_returns_held_text_at_end():
    m = StopMatcher(["xyz"])
    assert m.push("hello x") == "hello "
    assert m.flush() == "x"


def test_earliest_of_several_stops_wins():
    assert truncate_at_stop("one two three", ["three", "two"]) == ("one ", "two")
    text, matched, _ = stream(["abcd", "bc"], list("xabce"))
    assert (text, matched) == ("xa", "bc")
    # Overlapping stops that begin at the same place.
    assert stream(["ab", "abc"], ["a", "b", "c"])[:2] == ("", "ab")


def test_stop_at_very_start_and_inside_one_delta():
    assert stream(["\n\n"], ["\n\nfoo"])[:2] == ("", "\n\n")
    assert stream(["ll"], ["hello"])[:2] == ("he", "ll")


def test_nothing_after_stop_and_empty_pushes():
    m = StopMatcher(["x"])
    assert m.push("") == ""
    assert m.push("ax") == "a"
    assert m.push("more") == "" and m.flush() == ""


def test_self_overlapping_stop():
    # "aab" inside "aaab": the held suffix must be the longest partial match.
    assert stream(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", "aab")
    assert stream(["abab"], ["aba", "bab"])[:2] == ("", "abab")


def test_multibyte_characters_in_stops():
    assert stream(["日本"], ["こんに", "ちは日", "本語"])[:2] == ("こんにちは", "日本")


def test_random_chunkings_agree_with_whole_text():
    rng = random.Random(0)
    alphabet = "ab c\n"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 4))]
        # Whole-text expectation, written independently: earliest start wins.
        hits = [(text.find(s), s) for s in stops if text.find(s) >= 0]
        want = text[: min(hits)[0]] if hits else text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        got, matched, _ = stream(stops, pieces)
        assert got == want, (text, stops, pieces)
        assert (matched is not None) == bool(hits)
