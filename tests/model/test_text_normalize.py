"""Text normalisation in `Post.text()`: unit cases of `normalize_text`, and routers that score a
post spelled with look-alike letters and invisible characters like its plain spelling."""

import re
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import app.model.post as post_module
from app.model.post import Post
from app.model.router import Router
from app.model.store import load_router, new_router
from app.model.text_normalize import (
    _FOLD,
    _GENUINE,
    _LATIN,
    _WORD,
    _fold_lookalikes,
    normalize_text,
)
from app.model.tiny_encoders import (
    TINY_LORA,
    make_tiny_text_encoder_dir,
    text_encoder_router_config,
)

PLAIN = Post(title="free cruise, call now")
# Cyrillic е е с а а (U+0435, U+0441, U+0430) and a zero-width space.
DISGUISED = Post(title="fr\u0435\u0435 \u0441ruise\u200b, \u0441\u0430ll now")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("\u200b\u2060\ufeff", "", id="only-invisible"),
        pytest.param("ｆｒｅｅ ｃａｌｌ １２３", "free call 123", id="nfkc-fullwidth"),
        pytest.param("𝐟𝐫𝐞𝐞 ⓕⓡⓔⓔ ﬁne", "free free fine", id="nfkc-math-circled-ligature"),
        pytest.param(
            "fr\u200bee c\u200c\u200dall\u2060 \ufeffnow", "free call now", id="zero-width"
        ),
        pytest.param("di\u00adscount", "discount", id="soft-hyphen"),
        pytest.param("\u202eexe.gpj\u202c \u2066a\u2069", "exe.gpj a", id="bidi-controls"),
        pytest.param("a\x00b\x07c\x1bd\x7fe\x9bf", "abcdef", id="control-chars-removed"),
        pytest.param("a\r\nb\rc\x0bd\x0ce\x85f\u2028g", "a\nb\nc\nd\ne\nf\ng", id="line-breaks"),
        pytest.param("col1\tcol2\nline\x1fx", "col1\tcol2\nline x", id="tab-newline-kept"),
        pytest.param("\U000e0066\U000e0072free\U000e007f", "free", id="tag-characters"),
        pytest.param("fr\u0435\u0435 \u0441ruise", "free cruise", id="mixed-script-word-folded"),
        pytest.param("\u0421\u0410LL NOW", "CALL NOW", id="uppercase-keeps-case"),
        pytest.param("\u03bf\u03c1en h\u03bfuse", "open house", id="greek-lookalikes-folded"),
        pytest.param("\u0440\u0430\u0443 now", "pay now", id="wholly-lookalike-word-in-latin-text"),
        pytest.param("ꜰʀᴇᴇ ᴄʀᴜɪꜱᴇ", "free cruise", id="small-capitals"),
        pytest.param("Привет, как дела?", "Привет, как дела?", id="pure-cyrillic-kept"),
        pytest.param("сухо", "сухо", id="cyrillic-word-of-lookalikes-kept"),
        pytest.param("Москва сухо, free", "Москва сухо, free", id="genuine-russian-beside-latin"),
        pytest.param("Москва fr\u0435\u0435", "Москва free", id="mixed-word-beside-russian"),
        pytest.param("ο σκύλος τρέχει", "ο σκύλος τρέχει", id="pure-greek-kept"),
        pytest.param("Հայաստան", "Հայաստան", id="pure-armenian-kept"),
        pytest.param("great 🙂🔥 ❤\ufe0f 👍🏽", "great 🙂🔥 ❤\ufe0f 👍🏽", id="emoji-kept"),
        pytest.param(
            "👨\u200d👩\u200d👧 ❤\ufe0f\u200d🔥",
            "👨\u200d👩\u200d👧 ❤\ufe0f\u200d🔥",
            id="emoji-zwj-kept",
        ),
        pytest.param("fr\ufe0fee", "free", id="variation-selector-after-letter"),
        pytest.param("1\ufe0f\u20e3 \u00a9\ufe0f", "1\ufe0f\u20e3 \u00a9\ufe0f", id="keycap-kept"),
        pytest.param(
            "\u2122\ufe0f \U0001f130\u200d\U0001f131", "TM AB", id="nfkc-then-emoji-rules"
        ),
        pytest.param(
            "a\u200d\U0001f525 \U0001f525\u200db", "a\U0001f525 \U0001f525b", id="zwj-beside-letter"
        ),
        pytest.param("e\u200d\u0301", "\u00e9", id="composes-after-joiner"),
        pytest.param("\u0435\u0301 \u0441at", "\u00e9 cat", id="composes-after-fold"),
        pytest.param("e\u200b\u0301", "\u00e9", id="composes-after-strip"),
        pytest.param(
            "caf\u00e9 na\u00efve 東京 مرحبا",
            "caf\u00e9 na\u00efve 東京 مرحبا",
            id="other-text-kept",
        ),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_plain_ascii_is_returned_as_is() -> None:
    text = "Title: buy cheap followers now!\nOCR: 50% off\ttoday"
    assert normalize_text(text) is text


def test_lookalike_table_maps_other_scripts_to_latin_of_the_same_case() -> None:
    for lookalike, latin in _FOLD.items():
        name = unicodedata.name(lookalike)
        assert name.split()[0] in {"CYRILLIC", "GREEK", "ARMENIAN"}, name
        assert unicodedata.name(latin).startswith("LATIN"), (name, latin)
        assert lookalike.isupper() == latin.isupper(), (name, latin)


# Letters of each script involved, look-alikes, invisibles, controls, accents, emoji, spaces.
_ALPHABET = st.sampled_from(
    [
        *"abcefopxyEOP АаВЕеКкОоРрСсУуХхЖжЯя ΑαΟοΡρσλ Օօսք é\u0301\u0308 ｆ𝐟ꜰᴇ ",
        *"\u200b\u200c\u200d\u00ad\u202e\ufeff\ufe0f\r\n\t\x00\x1f\x85\u2028",
        *"🙂👨❤\U000e00411,-\u20e3\u2122\U0001f130ⓕ",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=40))
def test_normalize_text_is_idempotent(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert unicodedata.is_normalized("NFKC", once)


def _fold_word_by_word(text: str) -> str:
    """Step 5 the slow, obvious way: a Python call per word."""
    latin, genuine = re.compile(f"[{_LATIN}]"), set(_GENUINE)
    if not latin.search(text) or not set(_FOLD) & set(text):
        return text
    fold = str.maketrans(_FOLD)
    if not genuine & set(text):
        return text.translate(fold)
    words = re.compile(f"[{_WORD}]+")
    return words.sub(lambda m: m[0].translate(fold) if latin.search(m[0]) else m[0], text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=40))
def test_lookalike_folding_matches_the_word_by_word_rule(text: str) -> None:
    assert _fold_lookalikes(text) == _fold_word_by_word(text)


def test_post_text_normalises_each_part_and_keeps_the_newline() -> None:
    post = Post(title="fr\u0435\u0435\u200b cruise", ocr_text="line one\r\nline\u00adtwo")
    assert post.text() == "Title: free cruise\nOCR: line one\nlinetwo"
    assert Post(title="\u200b\u200b", ocr_text="x").text() == "OCR: x"


@pytest.fixture(scope="module")
def text_router(tmp_path_factory: pytest.TempPathFactory) -> Router:
    """A text-encoder router built from a config on the tiny encoder, LoRA B made non-zero."""
    folder = tmp_path_factory.mktemp("normalize")
    encoder = make_tiny_text_encoder_dir(folder / "text")
    config = text_encoder_router_config(path=str(encoder), lora=TINY_LORA, max_text_tokens=32)
    router = new_router(config, folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in router.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    probe = router.build_inputs([Post(title="free"), Post(title="cat")])["input_ids"]
    if torch.equal(probe[0], probe[1]):
        # transformers 5 ignores `BertTokenizerFast(vocab_file=...)`: every word is [UNK].
        pytest.skip("the tiny text encoder's tokenizer reads every word as [UNK]")
    return router.eval()


@pytest.fixture(scope="module")
def qwen_router(tiny_store: Path) -> Router:
    """The tiny Qwen3-VL router: a byte-level tokenizer, which reads zero-width characters."""
    return load_router(tiny_store)


@pytest.fixture(params=["text_router", "qwen_router"])
def router(request: pytest.FixtureRequest) -> Router:
    """Each backbone family with a tokenizer of its own: WordPiece, byte-level BPE."""
    return request.getfixturevalue(request.param)


def test_disguised_spelling_scores_like_the_plain_one(router: Router) -> None:
    inputs = router.build_inputs([PLAIN, DISGUISED])
    assert torch.equal(inputs["input_ids"][0], inputs["input_ids"][1])
    plain, disguised = router.predict_proba([PLAIN]), router.predict_proba([DISGUISED])
    torch.testing.assert_close(disguised, plain, atol=1e-6, rtol=0)


def test_without_normalisation_the_disguise_would_change_the_scores(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the router tells these texts apart, so the equality above is not trivial."""
    plain = router.predict_proba([PLAIN])
    other = router.predict_proba([Post(title="my cat is sleeping on the sofa")])
    assert (other - plain).abs().max() > 1e-4
    monkeypatch.setattr(post_module, "normalize_text", lambda text: text)
    disguised = router.predict_proba([DISGUISED])
    assert (disguised - plain).abs().max() > 1e-4
