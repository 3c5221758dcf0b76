"""Stop strings end the text where the OpenAI API ends it, across token boundaries, and streaming
holds back only what could still begin a stop string (llama3_np/text/stop.py)."""

import pytest
from hypothesis import given, settings, strategies as st

from llama3_np.errors import ParameterError
from llama3_np.text.stop import StopStrings, StopText, check_stop_strings
from llama3_np.load import load_tokenizer
from llama3_np.assets import default_model


def stream(stops, pieces):
    matcher = StopStrings(stops)
    shown = [matcher.push(p) for p in pieces]
    return shown, matcher.found, (matcher.flush() if matcher.found is None else "")


def test_a_stop_string_across_pieces_ends_the_text_before_it():
    shown, found, rest = stream(["###"], ["Hel", "lo #", "#", "# world"])
    assert (shown, found, rest) == (["Hel", "lo ", "", ""], "###", "")


def test_text_is_held_back_only_while_it_could_begin_a_stop_string():
    shown, found, rest = stream(["###"], ["a#", "#x", "y#"])
    assert (shown, found, rest) == (["a", "##x", "y"], None, "#")  # the last '#' comes out at the end


def test_the_stop_string_complete_first_wins_and_text_after_it_is_dropped():
    # "bc" is complete at 'c', before "abcd" could be: the text ends before "bc"
    assert stream(["abcd", "bc"], ["a", "b", "c", "d"])[:2] == (["", "", "a", ""], "bc")
    assert stream(["abcd", "bc"], ["abcd"])[:2] == (["a"], "bc")  # the same, whatever the pieces
    # complete at the same character: the longer one, which starts first
    assert stream(["cd", "bcd"], ["abcdef"])[:2] == (["a"], "bcd")


@settings(max_examples=300, deadline=None)
@given(st.text("ab#\n", max_size=30), st.lists(st.text("ab#\n", min_size=1, max_size=4), min_size=1, max_size=3),
       st.data())
def test_streamed_pieces_put_together_are_the_whole_texts_answer(text, stops, data):
    """However the text is cut into pieces, the pieces shown (and the end flushed) are the text
    up to the stop string complete first, and no piece is shown that a later stop string removes."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    shown, found, rest = stream(stops, pieces)
    whole, found_whole, rest_whole = stream(stops, [text])
    assert "".join(shown) + rest == "".join(whole) + rest_whole and found == found_whole
    # the reference: read one character at a time
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[:min(ends)[1]] if ends else text
    assert "".join(shown) + rest == expected


def test_stop_text_reads_token_ids_whose_bytes_split_characters():
    tok = load_tokenizer(default_model())
    ids = tok.encode("naïve 東京 🌸🎉 fin", bos=False)
    text = StopText(tok, ["🌸🎉"])
    shown = "".join(text.push(i) for i in ids if text.found is None) + text.flush()
    assert (shown, text.found) == ("naïve 東京 ", "🌸🎉")
    plain = StopText(tok)
    assert "".join(plain.push(i) for i in ids) + plain.flush() == "naïve 東京 🌸🎉 fin"


@pytest.mark.parametrize("stop", ["", ["###", ""], [None]])
def test_an_empty_stop_string_is_refused(stop):
    with pytest.raises(ParameterError, match="a stop string must be non-empty text") as e:
        check_stop_strings(stop)
    assert e.value.parameter == "stop"
