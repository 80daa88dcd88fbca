"""The AnatomiX prompt: Gemma chat layout, the image block, and one context line per region.

Layout (shared/anatomix-model.md, "Chat layout"), built as a string and tokenised with the base
tokenizer, which adds one more ``<bos>`` in front (so the ids start ``[2, 2, 105]``, as in training)::

    <bos><start_of_turn>user\\n{system}\\n\\nImage: \\n\\n<image_start>{1024 x <image>}<image_end>\\n\\n\\nLikely findings:\\n
    emb:<emb><obj_0></emb> box:<box>(x1,y1),(x2,y2)</box> {sentence 0}\\n ... (36 lines, joined by \\n)
    \\nTask: {instruction, trimmed}<end_of_turn>\\n<start_of_turn>model\\n

Gemma's template trims the user content, so an instruction's trailing newline disappears.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from inference.tokens import NUM_OBJECT_TOKENS, TokenIds

#: The system prompt used in training (one of three; the one we offer as ``training``).
TRAINING_SYSTEM_PROMPT = (
    "You are a specialized AI radiology assistant trained to interpret chest X-ray images. You are given some"
    " possible findings about this chest X-ray image. Some of these findings might not be correct. Use the given"
    " findings to complete the task"
)
#: The reference's own string entry point and its benchmark script (``benchmarking/mymodel.py``,
#: ``system_prompts=[""]``) pass an empty system prompt: the published figures were made that way.
EMPTY_SYSTEM_PROMPT = ""
#: ``model.system_prompt`` setting -> the text. ``empty`` (the paper's evaluation) is the default.
SYSTEM_PROMPTS = {"empty": EMPTY_SYSTEM_PROMPT, "training": TRAINING_SYSTEM_PROMPT}
DEFAULT_SYSTEM_PROMPT = "empty"
IMAGE_TOKENS = 1024

BoxXYXY = tuple[int, int, int, int]


class PromptError(ValueError):
    """A prompt could not be built or does not tokenise to the expected layout."""


def format_box(box: Sequence[float]) -> str:
    """``(x1,y1),(x2,y2)`` with integer model-frame pixels, no spaces (values truncated toward zero)."""
    if len(box) != 4:
        raise PromptError(f"a box needs 4 numbers (x1, y1, x2, y2), got {len(box)}")
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"({x1},{y1}),({x2},{y2})"


def format_boxes(boxes: Sequence[Sequence[float]]) -> str:
    """Several boxes, each wrapped in ``<box>..</box>``, sorted by (x1, y1), concatenated."""
    ordered = sorted((tuple(int(v) for v in box) for box in boxes), key=lambda b: (b[0], b[1]))
    return "".join(f"<box>{format_box(box)}</box>" for box in ordered)


def context_lines(boxes_xyxy_model: Sequence[Sequence[float]], sentences: Sequence[str]) -> str:
    """The 36 ``emb:<emb><obj_i></emb> box:<box>..</box> {sentence}`` lines, joined by newlines."""
    if len(boxes_xyxy_model) != NUM_OBJECT_TOKENS or len(sentences) != NUM_OBJECT_TOKENS:
        raise PromptError(f"need {NUM_OBJECT_TOKENS} region boxes and sentences, got {len(boxes_xyxy_model)} boxes and {len(sentences)} sentences")
    return "\n".join(
        f"emb:<emb><obj_{i}></emb> box:<box>{format_box(box)}</box> {sentence}" for i, (box, sentence) in enumerate(zip(boxes_xyxy_model, sentences))
    )


def build_prompt_text(
    instruction: str,
    boxes_xyxy_model: Sequence[Sequence[float]],
    sentences: Sequence[str],
    system_prompt: str = EMPTY_SYSTEM_PROMPT,
) -> str:
    """The full prompt string (with the template's own ``<bos>``; the tokenizer adds the second).

    ``system_prompt`` defaults to the engine's default (``model.system_prompt = "empty"``, as the
    paper's evaluation ran), so a direct caller gets the prompt the node sends; pass
    :data:`TRAINING_SYSTEM_PROMPT` for the training one.
    """
    user = (
        "Image: \n\n<image_start>"
        + "<image>" * IMAGE_TOKENS
        + "<image_end>\n\n\nLikely findings:\n"
        + context_lines(boxes_xyxy_model, sentences)
        + f"\nTask: {instruction}"
    ).strip()
    # Gemma's template prefixes the first user turn with the system content + "\n\n" (even when it is
    # empty: the reference's string entry point gives "user\n\n\nImage:") and trims only the user part.
    return f"<bos><start_of_turn>user\n{system_prompt}\n\n{user}<end_of_turn>\n<start_of_turn>model\n"


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt, checked against the layout."""

    text: str
    input_ids: tuple[int, ...]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, token_ids: TokenIds) -> EncodedPrompt:
    """Tokenise and verify: starts ``<bos> <bos> <start_of_turn>``, 1024 ``<image>``, each ``<obj_i>`` once.

    The check matters: a wrong count would silently mis-place the injected vectors (the reference
    skips it when generating).
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    head = [token_ids.bos, token_ids.bos, token_ids.start_of_turn]
    if ids[:3] != head:
        raise PromptError(f"prompt ids start {ids[:3]}, expected {head} (two <bos>, <start_of_turn>)")
    images = sum(1 for i in ids if i == token_ids.image)
    if images != IMAGE_TOKENS:
        raise PromptError(f"prompt holds {images} <image> tokens, expected {IMAGE_TOKENS}")
    counts = {obj: 0 for obj in token_ids.objects}
    for i in ids:
        if i in counts:
            counts[i] += 1
    wrong = [n for n, obj in enumerate(token_ids.objects) if counts[obj] != 1]
    if wrong:
        raise PromptError(f"prompt must hold each <obj_i> exactly once; wrong for i = {wrong[:8]}")
    return EncodedPrompt(text=text, input_ids=tuple(ids))


def system_prompt_text(name: str) -> str:
    """The system prompt named by the ``model.system_prompt`` setting."""
    try:
        return SYSTEM_PROMPTS[name]
    except KeyError:
        raise PromptError(f"unknown system prompt {name!r}; use one of {', '.join(SYSTEM_PROMPTS)}") from None
