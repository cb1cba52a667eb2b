"""Cross-tokenizer alignment with two tokenizers built locally, against a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers

from oprd_mega.bridge import AlignmentError, align_last_character

CORPUS = [
    "the student samples a response and the teacher reads it",
    "representations align at the last character of every token",
    "tokenizers differ: one splits characters, one learns merges",
]
ALPHABET = sorted(set("".join(CORPUS)))


def _char_tokenizer() -> Tokenizer:
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(ALPHABET)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return tokenizer


def _bpe_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # drops spaces: gaps between tokens
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["[UNK]", "[BOS]"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    bos = tokenizer.token_to_id("[BOS]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", bos)]
    )
    return tokenizer


CHAR, BPE = _char_tokenizer(), _bpe_tokenizer()


def _reference(student, teacher) -> list[int]:
    """Brute force: the last teacher token whose span contains the student's last character."""
    out = []
    for start, end in student:
        covering = [j for j, (s, e) in enumerate(teacher) if s < e and s <= end - 1 < e]
        out.append(covering[-1] if end > start and covering else -1)
    return out


def test_bpe_student_char_teacher_pairs_the_last_character() -> None:
    text = CORPUS[1]
    student = BPE.encode(text).offsets  # [BOS] has the empty span (0, 0)
    teacher = CHAR.encode(text).offsets
    assert len(teacher) == len(text)  # one teacher token per character
    with pytest.raises(AlignmentError, match=r"student token 0 at \(0, 0\) has an empty span"):
        align_last_character(student, teacher)
    partners = align_last_character(student, teacher, skip=True)
    assert partners[0] == -1
    assert partners[1:] == [end - 1 for _, end in student[1:]]
    assert len(set(partners[1:])) == len(student) - 1 > 10  # several chars per BPE token


def test_char_student_bpe_teacher_skips_dropped_whitespace() -> None:
    text = CORPUS[0]
    student, teacher = CHAR.encode(text).offsets, BPE.encode(text).offsets
    with pytest.raises(AlignmentError, match=r"student token 3 at \(3, 4\) has character 3"):
        align_last_character(student, teacher)
    partners = align_last_character(student, teacher, skip=True)
    assert [i for i, p in enumerate(partners) if p < 0] == [
        i for i, c in enumerate(text) if c == " "
    ]
    assert 0 not in partners  # the teacher's [BOS] covers nothing
    for (_, end), partner in zip(student, partners, strict=True):
        if partner >= 0:
            t_start, t_end = teacher[partner]
            assert t_start <= end - 1 < t_end
    assert partners == _reference(student, teacher)


@settings(max_examples=60)
@given(st.text(alphabet=[*ALPHABET, "\n", "é"], min_size=1, max_size=40))
def test_random_text_matches_brute_force(text: str) -> None:
    for student_tok, teacher_tok in ((CHAR, BPE), (BPE, CHAR)):
        student = student_tok.encode(text).offsets
        teacher = teacher_tok.encode(text).offsets
        assert align_last_character(student, teacher, skip=True) == _reference(student, teacher)


def test_duplicate_spans_take_the_last_piece_and_overlaps_are_refused() -> None:
    # Two byte pieces of one character share the span (1, 2); the second one is the partner.
    assert align_last_character([(0, 2)], [(0, 1), (1, 2), (1, 2), (2, 3)]) == [2]
    with pytest.raises(AlignmentError, match=r"teacher spans 0 \(0, 3\) and 1 \(2, 4\) overlap"):
        align_last_character([(0, 1)], [(0, 3), (2, 4)])
    with pytest.raises(AlignmentError, match="student span 0"):
        align_last_character([(3, 1)], [(0, 3)])
