"""Prompt layout: the exact string and the token ids the model was trained on."""

from __future__ import annotations

import pytest

from inference.engine import EngineOptions
from inference.prompt import (
    EMPTY_SYSTEM_PROMPT,
    TRAINING_SYSTEM_PROMPT,
    PromptError,
    build_prompt_text,
    context_lines,
    encode_prompt,
    format_boxes,
)
from inference.result import REGION_NAMES
from inference.tokens import TokenIds, add_anatomix_tokens, build_demo_tokenizer

BOXES = [(10 * i - 3, 20 + i, 300 + i, 400 + 2 * i) for i in range(36)]
SENTENCES = [f"{name} is healthy." for name in REGION_NAMES]


@pytest.fixture(scope="module")
def tokenizer():
    return add_anatomix_tokens(build_demo_tokenizer("tiny"))


def test_prompt_string_follows_the_training_layout() -> None:
    text = build_prompt_text("Generate findings and impressions:\n", BOXES, SENTENCES, system_prompt=TRAINING_SYSTEM_PROMPT)
    assert text.startswith(f"<bos><start_of_turn>user\n{TRAINING_SYSTEM_PROMPT}\n\nImage: \n\n<image_start><image>")
    assert (
        "<image>" * 1024 + "<image_end>\n\n\nLikely findings:\nemb:<emb><obj_0></emb> box:<box>(-3,20),(300,400)</box> Abdominal cavity is healthy.\n" in text
    )
    # lines joined by newlines, then the task; the template trims the instruction's trailing newline
    assert text.endswith("Right costodiaphragmatic recess is healthy.\nTask: Generate findings and impressions:<end_of_turn>\n<start_of_turn>model\n")


def test_empty_system_prompt_matches_the_reference_entry_point() -> None:
    text = build_prompt_text("Detect abnormalities in the given image.", BOXES, SENTENCES, system_prompt=EMPTY_SYSTEM_PROMPT)
    assert text.startswith("<bos><start_of_turn>user\n\n\nImage: \n\n<image_start>")


def test_without_a_system_prompt_the_text_is_what_the_engine_sends_by_default() -> None:
    """A direct caller who names no system prompt gets the engine's default (empty, the paper's
    evaluation), not the training one."""
    default = build_prompt_text("Detect abnormalities in the given image.", BOXES, SENTENCES)
    assert default == build_prompt_text("Detect abnormalities in the given image.", BOXES, SENTENCES, EngineOptions().system_prompt)
    assert default.startswith("<bos><start_of_turn>user\n\n\nImage: ")
    assert TRAINING_SYSTEM_PROMPT not in default


def test_token_ids_have_two_bos_1024_images_and_each_object_once(tokenizer) -> None:
    ids = TokenIds.from_tokenizer(tokenizer)
    encoded = encode_prompt(tokenizer, build_prompt_text("Generate findings and impressions:\n", BOXES, SENTENCES), ids)
    tokens = list(encoded.input_ids)
    assert tokens[:3] == [2, 2, 105]
    assert tokens.count(ids.image) == 1024
    assert all(tokens.count(obj) == 1 for obj in ids.objects)
    assert tokens.count(ids.box) == 36 and tokens.count(ids.box_end) == 36
    assert tokens[-3:] == [105, *tokenizer("model\n", add_special_tokens=False)["input_ids"]][-3:]
    end = tokens.index(ids.end_of_turn)
    assert tokenizer.decode(tokens[end - 3 : end]).endswith("ions:")


def test_a_prompt_with_a_wrong_object_count_is_refused(tokenizer) -> None:
    ids = TokenIds.from_tokenizer(tokenizer)
    text = build_prompt_text("Where is the <obj_3> located?", BOXES, SENTENCES)
    with pytest.raises(PromptError, match=r"<obj_i> exactly once; wrong for i = \[3\]"):
        encode_prompt(tokenizer, text, ids)


def test_context_needs_36_regions() -> None:
    with pytest.raises(PromptError, match="36 region boxes"):
        context_lines(BOXES[:35], SENTENCES[:35])


def test_boxes_are_sorted_by_x1_then_y1_and_truncated() -> None:
    assert format_boxes([(50, 1, 60, 9), (10.9, 5, 20, 30.7), (10, 2, 11, 3)]) == ("<box>(10,2),(11,3)</box><box>(10,5),(20,30)</box><box>(50,1),(60,9)</box>")


def test_system_prompt_setting_names_the_two_prompts_and_defaults_to_the_evaluation_one() -> None:
    from dicom_node.settings import ModelSettings, Settings, SettingsError, load_settings
    from inference.prompt import DEFAULT_SYSTEM_PROMPT, PromptError, system_prompt_text

    assert system_prompt_text("empty") == EMPTY_SYSTEM_PROMPT == ""
    assert system_prompt_text("training") == TRAINING_SYSTEM_PROMPT
    assert DEFAULT_SYSTEM_PROMPT == ModelSettings().system_prompt == "empty"
    with pytest.raises(PromptError, match="unknown system prompt 'chatty'"):
        system_prompt_text("chatty")
    assert isinstance(Settings(), Settings)
    with pytest.raises(SettingsError, match="model.system_prompt"):
        load_settings(None, env={"ANATOMIX_MODEL_SYSTEM_PROMPT": "chatty"})
