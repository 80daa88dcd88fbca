"""The demo tokenizer: Gemma's special ids, the 45 AnatomiX tokens appended in order, HF layout."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from inference.tokens import (
    ADDED_TOKENS,
    GEMMA_BASE_VOCAB,
    IMAGE_SOFT_TOKEN,
    TokenIds,
    TokenizerError,
    add_anatomix_tokens,
    build_demo_tokenizer,
    load_tokenizer,
)


def test_added_tokens_are_the_documented_45_in_order() -> None:
    assert len(ADDED_TOKENS) == 45
    assert ADDED_TOKENS[:7] == ("<image>", "<image_start>", "<image_end>", "<box>", "</box>", "<emb>", "</emb>")
    assert ADDED_TOKENS[7] == "<obj_0>" and ADDED_TOKENS[42] == "<obj_35>"
    assert ADDED_TOKENS[-2:] == ("<ref>", "</ref>")


def test_tiny_tokenizer_round_trips_through_hf_layout(tmp_path) -> None:
    build_demo_tokenizer("tiny").save_pretrained(str(tmp_path))
    tokenizer = load_tokenizer(tmp_path)
    ids = TokenIds.from_tokenizer(tokenizer)
    assert (ids.pad, ids.eos, ids.bos, ids.start_of_turn, ids.end_of_turn) == (0, 1, 2, 105, 106)
    # appended right after the base vocabulary, contiguous, in the documented order
    base = len(AutoTokenizer.from_pretrained(str(tmp_path)))
    assert ids.image == base and ids.ref_end == base + 44
    assert list(ids.objects) == list(range(base + 7, base + 43))
    # ordinary tokens: they survive skip_special_tokens, while Gemma's turn markers do not
    text = "<start_of_turn>model\n<ref>Right lung</ref><box>(1,2),(30,40)</box><end_of_turn>"
    decoded = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert decoded == "model\n<ref>Right lung</ref><box>(1,2),(30,40)</box>"


def test_full_tokenizer_places_added_tokens_after_image_soft_token() -> None:
    tokenizer = add_anatomix_tokens(build_demo_tokenizer("full"))
    vocab = tokenizer.get_vocab()
    assert vocab[IMAGE_SOFT_TOKEN] == GEMMA_BASE_VOCAB == 262144
    ids = TokenIds.from_tokenizer(tokenizer)
    assert ids.image == 262145 and ids.ref_end == 262189
    assert len(tokenizer) == 262190  # embedding has 262208 rows: the rest are padding rows


def test_adding_tokens_twice_keeps_ids() -> None:
    tokenizer = add_anatomix_tokens(build_demo_tokenizer("tiny"))
    first = TokenIds.from_tokenizer(tokenizer)
    assert TokenIds.from_tokenizer(add_anatomix_tokens(tokenizer)) == first


def test_tokenizer_without_anatomix_tokens_is_refused_by_name() -> None:
    with pytest.raises(TokenizerError, match="<image>"):
        TokenIds.from_tokenizer(build_demo_tokenizer("tiny"))


def test_missing_tokenizer_files_give_a_clear_error(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_demo_tokenizer_is_deterministic(tmp_path) -> None:
    build_demo_tokenizer("tiny").save_pretrained(str(tmp_path / "a"))
    build_demo_tokenizer("tiny").save_pretrained(str(tmp_path / "b"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
