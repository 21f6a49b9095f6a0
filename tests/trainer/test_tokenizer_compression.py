"""TokenizerCompression on real `tokenizers` objects: the key rules of ENGRAM.md §2, then the map."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.tokenizer_compression import TokenizerCompression, normalize_token_text

TRAINING_LINES = [
    "Hello world, hello World!", "The café serves Café au lait.", "    def f(x):",
    "        return x", "naïve NAÏVE naive", "HELLO hello Hello", "日本語のテキスト",
] * 20


def word_level(tokens: list[str]) -> Tokenizer:
    """A tokenizer whose id i decodes to exactly tokens[i] (no decoder: text kept verbatim)."""
    return Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(tokens)}, unk_token=tokens[0]))


@pytest.fixture(scope="module")
def byte_level_bpe() -> Tokenizer:
    """A small byte-level BPE: its lone bytes >= 0x80 decode to U+FFFD."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_LINES, trainer)
    return tokenizer


# --- the key rule, one test per step ---------------------------------------------------------

def test_nfkc_folds_compatibility_forms():
    assert normalize_token_text("\ufb01") == "fi"  # the "ﬁ" ligature
    assert normalize_token_text("ＡＢＣ１") == "abc1"  # fullwidth


def test_accents_are_stripped():
    assert normalize_token_text("Café") == "cafe"
    assert normalize_token_text("nai\u0308ve") == "naive"  # already decomposed


def test_lowercase():
    assert normalize_token_text("HeLLo") == "hello"


def test_whitespace_runs_collapse_to_one_space():
    assert normalize_token_text("a \t\n b") == "a b"


def test_exactly_one_space_is_kept():
    assert normalize_token_text(" ") == " "
    assert normalize_token_text("\t\t") == " "  # collapses to " ", then kept


def test_other_strings_are_stripped():
    assert normalize_token_text("  hello ") == "hello"


def test_empty_after_normalisation_falls_back_to_the_text():
    assert normalize_token_text("\u0301") == "\u0301"  # a lone combining acute strips to ""
    assert normalize_token_text("") == ""


def test_keep_whitespace_runs_keeps_whitespace_only_tokens_verbatim():
    assert normalize_token_text("    ", keep_whitespace_runs=True) == "    "
    assert normalize_token_text("\t", keep_whitespace_runs=True) == "\t"
    assert normalize_token_text("a  b", keep_whitespace_runs=True) == "a  b"
    assert normalize_token_text(" Café ", keep_whitespace_runs=True) == "cafe"  # other rules hold


# --- the map ---------------------------------------------------------------------------------

def test_canonical_ids_number_keys_in_order_of_first_appearance():
    compression = TokenizerCompression.from_tokenizer(
        word_level(["Hello", "hello", "HELLO ", "World", "[PAD]", " world", "\u0301"]))
    np.testing.assert_array_equal(compression.lookup, [0, 0, 0, 1, 2, 1, 3])
    assert compression.lookup.dtype == np.int64
    assert compression.num_canonical == 4
    assert compression.summary() == "7 -> 4 ids (57.1%), 42.9% smaller"


def test_pad_id_is_mapped_through_the_compression():
    compression = TokenizerCompression.from_tokenizer(word_level(["a", "A", "[PAD]", "[pad]"]))
    assert compression.map_pad(2) == 1
    assert compression.map_pad(3) == 1
    with pytest.raises(ValueError, match=r"token id 4 out of range \[0, 4\)"):
        compression.map_pad(4)


def test_replacement_char_tokens_are_keyed_by_their_raw_string(byte_level_bpe):
    compression = TokenizerCompression.from_tokenizer(byte_level_bpe)
    fragments = [tid for tid in range(byte_level_bpe.get_vocab_size())
                 if "\ufffd" in byte_level_bpe.decode([tid], skip_special_tokens=False)]
    # Decoded, they all read "\ufffd"-something; keyed by raw string they stay apart.
    assert len(fragments) > 128  # every lone byte >= 0x80, plus merges such as "NAÃ"
    assert len(set(compression.lookup[fragments])) == len(fragments)
    first_byte = byte_level_bpe.token_to_id("Ã")  # 0xC3, the lead byte of "é"
    second_byte = byte_level_bpe.token_to_id("©")  # 0xA9, its continuation byte
    assert compression.lookup[first_byte] != compression.lookup[second_byte]


def test_compression_shrinks_a_trained_bpe(byte_level_bpe):
    compression = TokenizerCompression.from_tokenizer(byte_level_bpe)
    assert compression.raw_vocab_size == byte_level_bpe.get_vocab_size()
    assert compression.ratio < 1
    hello, cap_hello = byte_level_bpe.token_to_id("hello"), byte_level_bpe.token_to_id("Hello")
    assert compression.lookup[hello] == compression.lookup[cap_hello]


def test_keep_whitespace_runs_keeps_indentation_tokens_distinct():
    tokenizer = word_level(["x", "    ", "        ", "\t", " ", "X "])
    default = TokenizerCompression.from_tokenizer(tokenizer)
    kept = TokenizerCompression.from_tokenizer(tokenizer, keep_whitespace_runs=True)
    np.testing.assert_array_equal(default.lookup, [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(kept.lookup, [0, 1, 2, 3, 4, 0])


@pytest.fixture
def compression() -> TokenizerCompression:
    return TokenizerCompression.from_tokenizer(word_level(["a", "A", "b", " b", "c"]))


def test_compress_keeps_shape(compression):
    ids = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.int32)
    np.testing.assert_array_equal(compression.compress(ids), [[0, 0, 1], [1, 2, 0]])


@pytest.mark.parametrize("bad", [-1, 5])
def test_compress_rejects_ids_out_of_range(compression, bad):
    with pytest.raises(ValueError, match=rf"token id {bad} out of range \[0, 5\)"):
        compression.compress(np.array([0, bad, 1]))
    with pytest.raises(ValueError, match=rf"token id {bad} out of range \[0, 5\)"):
        compression.compress_torch(torch.tensor([0, bad, 1]))


def test_compress_rejects_non_integer_ids(compression):
    with pytest.raises(ValueError, match="must be integers"):
        compression.compress(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="int32 or int64"):
        compression.compress_torch(torch.tensor([0.0]))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_compress_torch_equals_compress(byte_level_bpe, device, dtype):
    compression = TokenizerCompression.from_tokenizer(byte_level_bpe)
    ids = torch.randint(0, compression.raw_vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    out = compression.compress_torch(ids.to(device, dtype))
    assert out.device.type == device and out.dtype == torch.int64
    np.testing.assert_array_equal(out.cpu().numpy(), compression.compress(ids.numpy()))


def test_save_load_round_trip(byte_level_bpe, tmp_path):
    compression = TokenizerCompression.from_tokenizer(byte_level_bpe)
    compression.save(tmp_path / "compression.npz")
    loaded = TokenizerCompression.load(tmp_path / "compression.npz")
    np.testing.assert_array_equal(loaded.lookup, compression.lookup)
    assert loaded.num_canonical == compression.num_canonical


def test_rejects_a_lookup_that_misses_a_canonical_id():
    with pytest.raises(ValueError, match="does not map onto exactly 0..2"):
        TokenizerCompression(np.array([0, 2, 2], dtype=np.int64), 3)


@pytest.mark.slow
def test_ratio_on_the_corpus_tokenizer():
    """The stdlib corpus's 8192-token BPE: report both rules' ratios (printed with -s)."""
    from trainer.data import Corpus, CorpusConfig

    tokenizer = Corpus.load(CorpusConfig()).tokenizer
    default = TokenizerCompression.from_tokenizer(tokenizer)
    keep = TokenizerCompression.from_tokenizer(tokenizer, keep_whitespace_runs=True)
    print(f"\nstdlib BPE, default rule: {default.summary()}\nstdlib BPE, keep_whitespace_runs: {keep.summary()}")
    assert 0.5 < default.ratio < 0.8
    assert default.num_canonical < keep.num_canonical < default.raw_vocab_size
    # indentation runs (3 and 8 spaces): merged by the default rule, kept apart by the variant
    three, eight = tokenizer.token_to_id("ĠĠĠ"), tokenizer.token_to_id("ĠĠĠĠĠĠĠĠ")
    assert default.lookup[three] == default.lookup[eight]
    assert keep.lookup[three] != keep.lookup[eight]
