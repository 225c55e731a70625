"""Answer filters (refusal, repeated-word share, n-gram repetition, too short) and question parsing."""
import pytest

from megatron_longpo.generation.filters import (
    LEAD_PHRASES, LONGPO_CHOSEN_FILTER, LONGPO_REJECTED_FILTER, AnswerFilter, is_refusal, long_words,
    parse_questions, plain_words, repeated_word_share, repetition_ratio, with_lead_phrase)


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


def test_repeated_word_share_hand_computed():
    assert repeated_word_share("") == 0.0 and repeated_word_share("one two three") == 0.0
    assert repeated_word_share("a b a") == pytest.approx(2 / 3)
    # punctuation is deleted (not split on), case ignored: "Don't" == "dont"
    assert plain_words("Don't stop. DONT!") == ["dont", "stop", "dont"]
    assert repeated_word_share("Don't stop. DONT!") == pytest.approx(2 / 3)
    assert repeated_word_share("The light is bright. The light is bright.") == 1.0  # said twice


def test_repetition_thresholds_at_their_bounds():
    def text(repeated: int, unique: int) -> str:  # `repeated` copies of one word + `unique` distinct words
        return " ".join(["alpha"] * repeated + [f"word{i}" for i in range(unique)])

    at_095, at_090, between = text(19, 1), text(18, 2), text(37, 3)
    assert repeated_word_share(at_095) == pytest.approx(0.95)
    assert repeated_word_share(at_090) == pytest.approx(0.9)
    assert repeated_word_share(between) == pytest.approx(0.925)
    chosen, rejected = LONGPO_CHOSEN_FILTER, LONGPO_REJECTED_FILTER
    assert rejected.reason(at_095) is None and rejected.reason(text(20, 0)) == "repetitive"  # > 0.95 only
    assert chosen.reason(at_090) is None and chosen.reason(between) == "repetitive"  # > 0.9
    assert rejected.reason(between) is None
    assert chosen.reason(at_095) == "repetitive"


def test_repetition_threshold_separates_loops_from_prose():
    prose = ("The keepers worked in watches of four hours, and the rule book required that the keeper on "
             "watch never leave the lantern room while the light was burning.")
    loop = "The light is bright. " * 40
    f = AnswerFilter()
    assert repeated_word_share(prose) < 0.5 and f.reason(prose) is None
    assert repeated_word_share(loop) == 1.0 and f.reason(loop) == "repetitive"
    half = prose + " " + "The light is bright. " * 6
    assert 0.3 < repeated_word_share(half) < 0.9 and f.reason(half) is None
    # the n-gram ratio is an extra, opt-in filter
    assert repetition_ratio(loop) > 0.9 and 0.3 < repetition_ratio(half) < 0.9
    ngram_only = AnswerFilter(max_repeated_word_share=None, max_ngram_repetition=0.5)
    assert ngram_only.reason(loop) == "repetitive" and ngram_only.reason(prose) is None


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
    f = AnswerFilter()  # fewer than 2 words of >= 3 characters
    assert f.reason("") == "empty" and f.reason("   \n") == "empty"
    assert long_words("It is in 1851.") == 1
    assert f.reason("It is.") == "too_short" and f.reason("In 1851.") == "too_short"
    assert f.reason("Built in 1851.") is None
    assert AnswerFilter(min_long_words=0).reason("1851") is None
    assert AnswerFilter(min_long_words=3, long_word_chars=5).reason("Lighthouses shine brightly at sea") is None
    assert AnswerFilter(min_long_words=4, long_word_chars=5).reason("Lighthouses shine brightly at sea") == "too_short"


def test_refusals_dropped_in_chosen_kept_in_rejected():
    failure = "The text does not mention when the tower was built."
    refusal = "I'm sorry, but I can't assist with that."
    for text in (failure, refusal):
        assert LONGPO_CHOSEN_FILTER.reason(text) == "refusal"
        assert LONGPO_REJECTED_FILTER.reason(text) is None  # the long-context failure the DPO term pushes down


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
    # the reference's "1:" numbering; a quoted question is not glued to the explanation after it
    explained = ('Question 1: "What are the key themes of the text?"\nThis question asks the reader to find them.\n\n'
                 'Question 2: "How can the text be applied to daily life?"\nIt asks the reader to apply it.')
    assert parse_questions(explained) == ["What are the key themes of the text?",
                                          "How can the text be applied to daily life?"]
    assert parse_questions("1: What is X made of?\n2: Why is Y so?") == ["What is X made of?", "Why is Y so?"]


def test_lead_phrase():
    lead = "As described in the preceding text,"
    assert with_lead_phrase("What did the keepers record?", lead) == \
        "As described in the preceding text, what did the keepers record?"
    assert with_lead_phrase("Marion Keith built which tower?", lead) == \
        "As described in the preceding text, Marion Keith built which tower?"
    assert with_lead_phrase("What is X?", "") == "What is X?"
    assert len(LEAD_PHRASES) == 20 and len(set(LEAD_PHRASES)) == 20
    assert LEAD_PHRASES[0] == lead and all(p.endswith(",") and p[0].isupper() for p in LEAD_PHRASES)
