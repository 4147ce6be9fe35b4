"""The built-in test model: a tiny, randomly initialised Llama 3.2 Vision.

Built with the real transformers classes (``MllamaConfig``,
``MllamaForConditionalGeneration``, ``MllamaProcessor``) at the real image
settings (560-pixel tiles, up to 4 tiles, 14-pixel patches: 6,404 vision
states per image), with a tiny vision tower and text model, and a real
byte-level BPE tokenizer that has the Llama 3 special tokens at their real ids.
It is saved once to a cache directory and then loaded with ``from_pretrained``
exactly like real weights, so tests run the same code path end to end.

Its answers are random text: it exists so that llamascope can be set up,
tried and tested without downloading anything.

Its text-only sibling (``ensure_text_test_model``) is a tiny random Llama 3
text model built the same way: ``LlamaConfig`` and ``LlamaForCausalLM``, the
same tokenizer without the image token (128,256 ids, as Llama 3.1), and the
Llama 3 text chat template, so that text-only serving runs as with
Llama-3.1-8B-Instruct.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamascope.engines.templates import STOCK_TEMPLATE, TEXT_TEMPLATE

log = logging.getLogger(__name__)

# Bump when anything below changes what is built: the cache key includes it.
RECIPE_VERSION = 1
SEED = 20241022

# Llama 3 special tokens, in their real order, from id 128000.
BASE_VOCAB = 128000
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
IMAGE_TOKEN = "<|image|>"  # id 128256, as in Llama-3.2-11B-Vision-Instruct

# The Llama 3 pre-tokenizer pattern.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
A dog and a girl sit on the beach. The dog lifts its paw and the girl reaches out
her hand, as if they were shaking hands. Both look happy; behind them the sea is
calm and the light of the evening is warm. This is a photo of a quiet moment.
What is in the picture? Describe the image. Please answer in English.
The quick brown fox jumps over the lazy dog. A cat sleeps on a red chair near the
window, and a cup of tea stands on the table. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.
这是一张照片,照片中有一个女孩和一只狗。女孩坐在沙滩上,狗坐在她旁边。
背景是海滩和海洋,天气看起来很好。做一首诗描述这个场景。这是什么?
def describe(image): return model.generate(image, max_new_tokens=512)
You are a helpful assistant. Answer briefly and accurately.
"""


def _syllable_words(count: int, taken: set[str]) -> list[str]:
    """Readable filler words ("Ġbaku", "tesi", ...) so random output looks like text.

    They are ordinary vocabulary, never special tokens: a special filler would
    be dropped by ``skip_special_tokens`` and make random answers empty.
    """
    onsets = "b c d f g h j k l m n p r s t v w y z ch sh th".split()
    vowels = "a e i o u ai ou".split()
    syllables = [o + v for o in onsets for v in vowels]
    rng = random.Random(SEED)
    words: list[str] = []
    seen = set(taken)
    while len(words) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3))))
        token = ("Ġ" + word) if rng.random() < 0.8 else word
        if token not in seen:
            seen.add(token)
            words.append(token)
    return words


def build_tokenizer(image_token: bool = True):
    """A byte-level BPE tokenizer laid out like Llama 3's (ids and specials); Llama 3.2 Vision's ``<|image|>``
    at 128256 unless ``image_token`` is False."""
    # the command line imports this module: tokenizers and transformers load only when a model is built
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre
    learner.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = dict(learned["vocab"])
    merges: list[tuple[str, str]] = [
        (m.split(" ", 1)[0], m.split(" ", 1)[1]) if isinstance(m, str) else (m[0], m[1]) for m in learned["merges"]
    ]
    for word in _syllable_words(BASE_VOCAB - len(vocab), set(vocab)):
        vocab[word] = len(vocab)
    assert len(vocab) == BASE_VOCAB

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    specials = [_NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i}|>") for i in range(256)]
    # Real Llama 3 numbers the reserved tokens 0, 1, 2, ... in order, skipping named ones.
    n = 0
    for i in range(256):
        if i not in _NAMED_SPECIALS:
            specials[i] = f"<|reserved_special_token_{n}|>"
            n += 1
    tok.add_special_tokens([*specials, IMAGE_TOKEN] if image_token else specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BASE_VOCAB)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
    )
    assert not image_token or fast.convert_tokens_to_ids(IMAGE_TOKEN) == BASE_VOCAB + 256
    assert fast.convert_tokens_to_ids("<|eot_id|>") == BASE_VOCAB + 9
    return fast


# Llama-3.2-11B-Vision-Instruct's config.json, sizes only: the shape the GPU check and the memory plan's tests
# build (with random weights, or none).
ELEVEN_B = {
    "text_config": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
    },
    "vision_config": {
        "hidden_size": 1280,
        "image_size": 560,
        "patch_size": 14,
        "max_num_tiles": 4,
        "num_hidden_layers": 32,
        "num_global_layers": 8,
        "attention_heads": 16,
        "intermediate_size": 5120,
        "vision_output_dim": 7680,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
    },
    "image_token_index": 128256,
}


def build_model(text_overrides: dict[str, Any] | None = None):
    """The tiny Mllama model, seeded, with every gate opened (see below).

    ``text_overrides`` changes the text model's shape (benchmarks build larger random models this way).
    """
    # PyTorch and transformers only when a model is built (the command line imports this module)
    import torch
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration

    config = MllamaConfig(
        vision_config={
            "image_size": 560,
            "patch_size": 14,
            "max_num_tiles": 4,
            "hidden_size": 32,
            "attention_heads": 2,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "intermediate_layers_indices": [0, 1],
            "vision_output_dim": 96,  # hidden_size * (1 + len(intermediate_layers_indices))
        },
        text_config={
            "vocab_size": BASE_VOCAB + 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "cross_attention_layers": [1, 3],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 131072,
            "bos_token_id": BASE_VOCAB,
            "eos_token_id": [BASE_VOCAB + 1, BASE_VOCAB + 8, BASE_VOCAB + 9],
            "pad_token_id": BASE_VOCAB + 4,
            "initializer_range": 0.5,
            **(text_overrides or {}),
        },
        image_token_index=BASE_VOCAB + 256,
    )
    torch.manual_seed(SEED)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        # Fresh Mllama gates are zero: tanh(0) = 0 would cut the image off the
        # text model entirely, so every answer would ignore the picture.
        for name, param in model.named_parameters():
            if name.endswith(("gate", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    model.generation_config = GenerationConfig(
        bos_token_id=BASE_VOCAB,
        eos_token_id=[BASE_VOCAB + 1, BASE_VOCAB + 8, BASE_VOCAB + 9],
        pad_token_id=BASE_VOCAB + 4,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    return model


# The text model's shape: the vision model's text part without its cross-attention layers.
_TEXT_SHAPE: dict[str, Any] = {
    "vocab_size": BASE_VOCAB + 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "initializer_range": 0.5,
}
_EOS_IDS = [BASE_VOCAB + 1, BASE_VOCAB + 8, BASE_VOCAB + 9]  # end_of_text, eom, eot: as Llama 3.1's


def build_text_model():
    """The tiny Llama 3 text model, seeded, with Llama 3.1's special ids and generation settings."""
    # as in build_model
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **_TEXT_SHAPE,
        bos_token_id=BASE_VOCAB,
        eos_token_id=_EOS_IDS,
        pad_token_id=BASE_VOCAB + 4,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=BASE_VOCAB, eos_token_id=_EOS_IDS, do_sample=True, temperature=0.6, top_p=0.9
    )
    return model


def build_processor(tokenizer):
    # as in build_model
    from transformers import MllamaProcessor
    from transformers.models.mllama import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=STOCK_TEMPLATE)


def _recipe_key(text_overrides: dict[str, Any] | None = None) -> str:
    # for their versions, only when a model is looked for (the command line imports this module)
    import tokenizers
    import transformers

    raw = f"{RECIPE_VERSION}:{SEED}:{transformers.__version__}:{tokenizers.__version__}"
    # The templates are saved into the model: a changed one is another model (a cached build kept the old one).
    raw += ":" + hashlib.sha256((STOCK_TEMPLATE + TEXT_TEMPLATE).encode()).hexdigest()
    if text_overrides:  # another shape is another model
        raw += ":" + json.dumps(text_overrides, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def ensure_test_model(cache_dir: Path, text_overrides: dict[str, Any] | None = None) -> Path:
    """Return the directory of the built-in test model, building it on first use."""

    def build(into: Path) -> None:
        build_processor(build_tokenizer()).save_pretrained(into)
        build_model(text_overrides).save_pretrained(into)

    key = _recipe_key(text_overrides)
    return _built_once(Path(cache_dir) / f"test-model-{key}", build, "Llama 3.2 Vision")


def ensure_text_test_model(cache_dir: Path) -> Path:
    """Return the directory of the built-in text-only test model (a tiny Llama 3), building it on first use."""

    def build(into: Path) -> None:
        tokenizer = build_tokenizer(image_token=False)
        tokenizer.chat_template = TEXT_TEMPLATE
        tokenizer.save_pretrained(into)
        build_text_model().save_pretrained(into)

    return _built_once(Path(cache_dir) / f"text-model-{_recipe_key({'text_only': True})}", build, "Llama 3 text")


def _built_once(target: Path, build: Callable[[Path], None], kind: str) -> Path:
    """Build into a temporary directory that is renamed into place, so a crash or a concurrent build never
    leaves a half-written model behind."""
    root = target.parent
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("building the built-in test model in %s (once)", target)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build(tmp)
        (tmp / "LLAMASCOPE_TEST_MODEL").write_text(
            f"A tiny randomly initialised {kind} model built by llamascope. Its answers are random text.\n"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_test_model(path: Path) -> bool:
    return (Path(path) / "LLAMASCOPE_TEST_MODEL").is_file()
