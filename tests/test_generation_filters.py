"""Answer filters (refusal, repetition ratio, too short) and question parsing."""
import pytest

from megatron_longpo.generation.filters import (
    AnswerFilter, is_refusal, parse_questions, repetition_ratio, with_lead_phrase)


def test_repetition_ratio_hand_computed():
    # 8 words -> 5 four-grams, all distinct
    assert repetition_ratio("one two three four five six seven eight") == 0.0
    # "a b c d" x 3 = 12 words -> 9 four-grams, 4 distinct -> 1 - 4/9
    assert repetition_ratio("a b c d a b c d a b c d") == pytest.approx(1 - 4 / 9)
    # one word 20 times -> 17 four-grams, 1 distinct
    assert repetition_ratio("yes " * 20) == pytest.approx(1 - 1 / 17)
    # fewer words than n -> 0; case and punctuation are ignored
    assert repetition_ratio("Yes, yes. YES!") == 0.0
    assert repetition_ratio("The cat. the CAT, the cat the cat", n=2) == pytest.approx(1 - 2 / 7)
    with pytest.raises(ValueError):
        repetition_ratio("x", n=0)


def test_repetition_threshold_separates_loops_from_prose():
    prose = ("The keepers worked in watches of four hours, and the rule book required that the keeper on "
             "watch never leave the lantern room while the light was burning.")
    loop = "The light is bright. " * 40  # 4 words looped 40 times: 157 four-grams, 4 distinct
    f = AnswerFilter()
    assert repetition_ratio(prose) < 0.05 and f.reason(prose) is None
    assert repetition_ratio(loop) > 0.9 and f.reason(loop) == "repetitive"
    # a loop that only fills a third of the answer is not degenerate enough to drop
    half = prose + " " + "The light is bright. " * 6
    assert 0.3 < repetition_ratio(half) < 0.9 and f.reason(half) is None


@pytest.mark.parametrize("text", [
    "I can't assist with that request.",
    "I’m sorry, but I cannot help with this.",  # curly apostrophe
    "As an AI language model, I do not have opinions.",
    "I am unable to answer questions about this document.",
    "Unfortunately, the text does not provide this information.",
    "I apologize, but the context is missing.",
])
def test_refusals_are_caught(text):
    assert is_refusal(text)
    assert AnswerFilter().reason(text) == "refusal"
    assert AnswerFilter(drop_refusals=False).reason(text) != "refusal"


@pytest.mark.parametrize("text", [
    "The keepers could not assist the ship because the storm was too strong.",
    "She was sorry that the tower took so long to build.",
    "The text describes three keepers and their duties.",
])
def test_ordinary_answers_are_not_refusals(text):
    assert not is_refusal(text)
    assert AnswerFilter().reason(text) is None


def test_too_short_and_empty():
    f = AnswerFilter(min_words=4)
    assert f.reason("") == "empty" and f.reason("   \n") == "empty"
    assert f.reason("In 1851.") == "too_short"
    assert f.reason("It was finished in 1851.") is None
    assert AnswerFilter(min_words=1).reason("1851") is None


def test_parse_numbered_bulleted_and_bold_lists():
    out = ("Here are four questions about the text:\n\n"
           "1. Why was the tower built on the highest part of the rock?\n"
           "2) What did the keepers record three times a day?\n"
           "**3.** How did electricity change the work of the keepers?\n"
           "Q4: When did the last keepers leave?\n"
           "- When did the last keepers leave?\n")  # duplicate
    assert parse_questions(out) == [
        "Why was the tower built on the highest part of the rock?",
        "What did the keepers record three times a day?",
        "How did electricity change the work of the keepers?",
        "When did the last keepers leave?",
    ]
    bullets = "* What is a starter?\n• Why does a cool fermentation taste sharper?\n- What is hydration in bread dough?"
    assert parse_questions(bullets) == [
        "What is a starter?", "Why does a cool fermentation taste sharper?", "What is hydration in bread dough?"]


def test_parse_inline_wrapped_and_unlisted_questions():
    assert parse_questions("1. What is X made of? 2. Why is Y so? 3. How does Z work?") == [
        "What is X made of?", "Why is Y so?", "How does Z work?"]
    wrapped = "1. What did the group learn about siting\n   the rain gauges?\n2. Why were schools chosen?"
    assert parse_questions(wrapped) == ["What did the group learn about siting the rain gauges?",
                                        "Why were schools chosen?"]
    prose = "The text is about bread. What is a sourdough starter? Also, how long does it take to rise?"
    assert parse_questions(prose) == ["What is a sourdough starter?", "Also, how long does it take to rise?"]
    # items without a question mark are kept only when no item has one
    assert parse_questions("1. Explain how the network found faults\n2. Describe the gauges") == [
        "Explain how the network found faults", "Describe the gauges"]
    statements = "1. The water company changed its rules.\n2. The group has published its data."
    assert parse_questions(statements) == []  # statements are not questions
    assert parse_questions("1. Why?\n2. Ok") == []  # fragments under 3 words
    assert parse_questions("") == []


def test_lead_phrase():
    lead = "As described in the preceding text,"
    assert with_lead_phrase("What did the keepers record?", lead) == \
        "As described in the preceding text, what did the keepers record?"
    assert with_lead_phrase("Marion Keith built which tower?", lead) == \
        "As described in the preceding text, Marion Keith built which tower?"
    assert with_lead_phrase("What is X?", "") == "What is X?"
