"""The AnatomiX vocabulary: Gemma's special tokens, the 45 added tokens, and the demo tokenizer.

The authors extend the MedGemma tokenizer with 45 *ordinary* tokens (not special ones, so they
survive ``skip_special_tokens`` when an answer is decoded). Their ids are appended right after the
base vocabulary in the order of :data:`ADDED_TOKENS`; a string already in the base vocabulary is
skipped by ``add_tokens``, so ids are always read back from the tokenizer, never hard-coded.

The real MedGemma tokenizer is gated; :func:`build_demo_tokenizer` builds a Gemma-style one locally
(byte-fallback BPE, ``▁`` for spaces, one token per digit, the same special ids) so the demo model
directory loads through exactly the same path as the authors' files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inference.result import CHEXPERT_LABELS, REGION_NAMES

NUM_OBJECT_TOKENS = 36
#: The 45 tokens the authors add, in their order (ids are contiguous in this order).
ADDED_TOKENS: tuple[str, ...] = (
    "<image>",
    "<image_start>",
    "<image_end>",
    "<box>",
    "</box>",
    "<emb>",
    "</emb>",
    *(f"<obj_{i}>" for i in range(NUM_OBJECT_TOKENS)),
    "<ref>",
    "</ref>",
)
assert len(ADDED_TOKENS) == 45

#: Gemma's fixed special ids (checked against the tokenizer at load, see :class:`TokenIds`).
GEMMA_SPECIAL_IDS: dict[str, int] = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
#: Gemma 3's image placeholder closes its base vocabulary (id 262144 in the real tokenizer).
IMAGE_SOFT_TOKEN = "<image_soft_token>"
#: Base vocabulary size of the real Gemma 3 tokenizer without ``<image_soft_token>``.
GEMMA_BASE_VOCAB = 262144


class TokenizerError(ValueError):
    """The tokenizer in a model directory lacks a token the prompt layout needs."""


@dataclass(frozen=True)
class TokenIds:
    """Every token id the prompt builder, the injection and the decoder use, read from a tokenizer."""

    pad: int
    eos: int
    bos: int
    start_of_turn: int
    end_of_turn: int
    image: int
    image_start: int
    image_end: int
    box: int
    box_end: int
    emb: int
    emb_end: int
    #: ``<obj_0>`` ... ``<obj_35>``; object i receives the APM's anatomy token i.
    objects: tuple[int, ...]
    ref: int
    ref_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenIds:
        """Look every token up; raise :class:`TokenizerError` naming each one that is unknown."""
        vocab = tokenizer.get_vocab()
        wanted = (*GEMMA_SPECIAL_IDS, *ADDED_TOKENS)
        missing = [token for token in wanted if token not in vocab]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks {len(missing)} token(s) the AnatomiX prompt needs: {', '.join(missing[:8])}"
                " - use the tokenizer saved with the AnatomiX checkpoint (45 added tokens)"
            )
        for token, expected in GEMMA_SPECIAL_IDS.items():
            if vocab[token] != expected:
                raise TokenizerError(f"tokenizer maps {token} to id {vocab[token]}, Gemma uses {expected}")
        ids = [vocab[token] for token in ADDED_TOKENS]
        if ids != list(range(ids[0], ids[0] + len(ids))):
            # Not fatal for inference, but it means the tokenizer is not the one the model was trained with.
            raise TokenizerError(f"the 45 added tokens are not contiguous in this tokenizer (ids {ids[0]}..{ids[-1]})")
        return cls(
            pad=vocab["<pad>"],
            eos=vocab["<eos>"],
            bos=vocab["<bos>"],
            start_of_turn=vocab["<start_of_turn>"],
            end_of_turn=vocab["<end_of_turn>"],
            image=vocab["<image>"],
            image_start=vocab["<image_start>"],
            image_end=vocab["<image_end>"],
            box=vocab["<box>"],
            box_end=vocab["</box>"],
            emb=vocab["<emb>"],
            emb_end=vocab["</emb>"],
            objects=tuple(vocab[f"<obj_{i}>"] for i in range(NUM_OBJECT_TOKENS)),
            ref=vocab["<ref>"],
            ref_end=vocab["</ref>"],
        )

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer when stopping early is enabled: ``<end_of_turn>`` and ``<eos>``."""
        return (self.end_of_turn, self.eos)


def add_anatomix_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Append the 45 AnatomiX tokens as ordinary tokens, as the authors do at load time.

    ``add_tokens`` skips strings the vocabulary already holds, so this is a no-op on a tokenizer
    saved after extension; ids are then read back with :meth:`TokenIds.from_tokenizer`.
    """
    tokenizer.add_tokens(list(ADDED_TOKENS), special_tokens=False)
    return tokenizer


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """Load the base (MedGemma) tokenizer saved in Hugging Face layout, never from the hub, and
    extend it with the 45 AnatomiX tokens."""
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer.model").is_file():
        raise TokenizerError(f"{directory} holds no tokenizer.json / tokenizer.model: copy MedGemma's tokenizer files there")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return add_anatomix_tokens(tokenizer)


# ---- demo tokenizer -------------------------------------------------------------------------------

_FILLER = "<unused{}>"


def _demo_corpus() -> list[str]:
    """Text the demo BPE is trained on: the words the prompts and template answers use."""
    words = [
        "You are a specialized AI radiology assistant trained to interpret chest X-ray images.",
        "You are given some possible findings about this chest X-ray image. Some of these findings might not",
        "be correct. Use the given findings to complete the task",
        "Image: Likely findings: emb: box: Task: user model",
        "Generate findings and impressions: Findings: Impression: No acute cardiopulmonary process.",
        "Where is the located in this Chest X-ray? The is located at the coordinates",
        "Please locate the following phrase: Please give the corresponding diagnosis for the following region(s):",
        "Please generate a caption for the following region(s): Detect abnormalities in the given image.",
        "No abnormalities detected. Given the CXR, identify any diseases. Options: (A) yes (B) no",
        "shows and is healthy. opacity effusion atelectasis consolidation pneumothorax edema nodule mass",
        "there is no the heart size is normal lungs are clear small moderate large left right bilateral",
    ]
    words += [f"{name} is healthy. {name} shows opacity and effusion." for name in REGION_NAMES]
    words += list(CHEXPERT_LABELS)
    # every character the prompt layout uses, so none of it needs byte fallback
    words.append("0 1 2 3 4 5 6 7 8 9 ( ) , - : ? . \n (12,345),(678,901)")
    return words


def build_demo_tokenizer(size: Literal["tiny", "full"], bpe_vocab: int = 700) -> PreTrainedTokenizerFast:
    """A Gemma-style *base* tokenizer with the real special ids (the 45 AnatomiX tokens are added at
    load time by :func:`add_anatomix_tokens`, as the authors do with MedGemma's).

    ``full`` pads the base vocabulary with ``<unusedN>`` fillers to :data:`GEMMA_BASE_VOCAB` entries and
    closes it with ``<image_soft_token>`` (262144), so the added tokens land at 262145-262189 as in the
    authors' tokenizer; ``tiny`` keeps only the learned pieces. Deterministic (no randomness involved).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    # 1. learn merges on the corpus with a throw-away tokenizer using the same normalisation
    def configure(tok: Tokenizer) -> None:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next"), pre_tokenizers.Digits(individual_digits=True)]
        )

    scratch = Tokenizer(models.BPE(unk_token=None))
    configure(scratch)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, show_progress=False, special_tokens=[])
    scratch.train_from_iterator(_demo_corpus(), trainer=trainer)
    learned = scratch.model.get_vocab() if hasattr(scratch.model, "get_vocab") else scratch.get_vocab()
    merges = _read_merges(scratch)

    # 2. lay out the final vocabulary: Gemma specials at their ids, fillers, bytes, learned pieces
    vocab: dict[str, int] = {}

    def put(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for token in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"):
        put(token)
    while len(vocab) < GEMMA_SPECIAL_IDS["<start_of_turn>"]:
        put(_FILLER.format(len(vocab)))
    put("<start_of_turn>")
    put("<end_of_turn>")
    for byte in range(256):
        put(f"<0x{byte:02X}>")
    for token, _ in sorted(learned.items(), key=lambda item: item[1]):
        put(token)
    if size == "full":
        while len(vocab) < GEMMA_BASE_VOCAB:
            put(_FILLER.format(len(vocab)))
        put(IMAGE_SOFT_TOKEN)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    configure(tok)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    if size == "full":
        specials.append(IMAGE_SOFT_TOKEN)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[3:],
        padding_side="left",
    )
    return fast


def _read_merges(tok) -> list[tuple[str, str]]:
    """The merges of a trained BPE, read from its JSON (the Python API does not expose them)."""
    import json

    pairs: list[tuple[str, str]] = []
    for merge in json.loads(tok.to_str())["model"]["merges"]:  # "a b" (older tokenizers) or ["a", "b"]
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.append((left, right))
    return pairs
