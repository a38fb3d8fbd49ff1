"""models.build_default's data choices: which WordNet words count as common, what questions they become,
and how chat tuning weights them. Built on a hand-written miniature of WordNet's database files."""

from collections import Counter

import pytest

from models.build_default.card import definition_of, overlap_f1
from models.build_default.data import COMMON_PHRASINGS, _is_val, common_words, wordnet_conversations
from models.build_default.stages import COMMON_REPEATS, sft_conversations

# index.POS: lemma pos synset_cnt p_cnt [pointers] sense_cnt tagsense_cnt offsets...
# data.POS: offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt | gloss "example"
WORDNET = {
    "index.noun": b"  header line\ndog n 1 0 1 5 00000001\nrun n 1 0 1 1 00000002\naardvark n 1 0 1 1 00000003\n",
    "data.noun": (
        b'00000001 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; "the dog barked all night"\n'
        b"00000002 04 n 01 run 0 000 | a score in baseball\n"
        b"00000003 05 n 01 aardvark 0 000 | nocturnal burrowing mammal\n"
    ),
    "index.verb": b"run v 1 0 1 9 00000010\n",
    "data.verb": b'00000010 38 v 02 run 0 go_quickly 0 000 | move fast by using one\'s feet; "Don\'t run--you\'ll be late"\n',
    "index.adj": b"",
    "data.adj": b"",
    "index.adv": b"",
    "data.adv": b"",
}


def test_common_words_are_the_most_frequent_in_chat_with_their_main_part_of_speech():
    frequencies = Counter({"run": 50, "dog": 20, "aardvark": 1, "the": 500})
    assert common_words(WORDNET, frequencies, n=2) == {"run": "verb", "dog": "noun"}  # "the": not in WordNet


def test_common_words_get_several_phrasings_and_stay_in_training():
    records = list(wordnet_conversations(WORDNET, {"dog": "noun", "run": "verb"}))
    by_id = {r["id"]: r for r in records}
    dog_meaning = [r for r in records if r["id"].startswith("wordnet/dog/mean/")]
    assert len(dog_meaning) == COMMON_PHRASINGS
    assert len({r["messages"][0]["content"] for r in dog_meaning}) == COMMON_PHRASINGS
    assert all(r["common"] for r in dog_meaning)
    assert dog_meaning[0]["messages"][1]["content"] == (
        'Dog (noun) means a member of the genus Canis. For example: "The dog barked all night."'
    )
    assert by_id["wordnet/dog/syn/noun"]["messages"][1]["content"] == "Another word for dog is domestic dog."
    # "run" is common as a verb only: the noun sense is asked once, unflagged.
    run_noun = [r for r in records if r["id"].startswith("wordnet/run/mean/noun")]
    assert len(run_noun) == 1 and "common" not in run_noun[0]
    assert by_id["wordnet/run/use/verb"]["common"]
    assert [r for r in records if r["id"].startswith("wordnet/aardvark/")][0].get("common") is None


def test_chat_tuning_repeats_common_words_and_leaves_rare_ones_to_pretraining():
    chat = {"id": "chitchat/1", "source": "chitchat", "messages": []}
    records = list(wordnet_conversations(WORDNET, {"dog": "noun"})) + [chat]
    tuned = sft_conversations(records)
    common = [r for r in records if r.get("common")]
    assert len(tuned) == COMMON_REPEATS * len(common) + 1
    assert chat in tuned
    assert not any(r["id"].startswith(("wordnet/aardvark", "wordnet/run")) for r in tuned)


def test_validation_split_keeps_all_questions_about_a_word_together():
    ids = [f"wordnet/dog/{kind}" for kind in ("mean/noun/0", "mean/noun/1", "use/noun", "syn/noun")]
    assert len({_is_val(i) for i in ids}) == 1


def test_definition_test_scores_the_definition_not_the_answer_template():
    reference = 'Dog (noun) means a member of the genus Canis. For example: "The dog barked all night."'
    assert definition_of(reference) == "a member of the genus Canis"
    assert definition_of("Bar (verb) means make a peanut butter. It can also mean a pub.") == "make a peanut butter"
    assert definition_of("no idea") == "no idea"
    assert overlap_f1(definition_of(reference), "a member of the genus Canis") == 1.0
    invented = "Dog (noun) means a large piece of material. For example: \"The dog barked all night.\""
    assert overlap_f1(definition_of(invented), definition_of(reference)) == pytest.approx(2 * (2 / 5 * 2 / 6) / (2 / 5 + 2 / 6))  # "a", "of"
    assert overlap_f1("", "anything") == 0.0
