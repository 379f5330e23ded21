import numpy as np
import pytest

from jaxdp import data


def test_shared_tokenizer_encodes_hello_world(tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    assert data.tokenize(tok, "Hello world").tolist() == [15496, 995]
    assert data.tokenize(tok, " The quick brown fox").tolist() == [383, 2068, 7586, 21831]
    assert tok.eos_token_id == 50256


def test_blocks_are_contiguous_and_drop_the_tail():
    ids = np.arange(23, dtype=np.int32)
    blocks = data.to_blocks(ids, 7)
    assert blocks.shape == (3, 7)
    np.testing.assert_array_equal(blocks.reshape(-1), ids[:21])
    with pytest.raises(ValueError, match="block_size"):
        data.to_blocks(ids, 1)


def test_text_files_concatenate_in_order(tmp_path, tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello world. ")
    b.write_text("The quick brown fox jumps over the lazy dog.")
    expected = np.concatenate(
        [data.tokenize(tok, a.read_text()), data.tokenize(tok, b.read_text())]
    )
    blocks = data.load_rows(data.TextSource("text_files", files=(a, b)), tok, block_size=4).tokens
    np.testing.assert_array_equal(blocks.reshape(-1), expected[: blocks.size])
    assert blocks.size == len(expected) // 4 * 4
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.TextSource("text_files", files=(tmp_path / "missing.txt",)).check()


def test_line_by_line_tokenization_equals_whole_text_on_wikitext(shared_data, tokenizer_dir):
    """Tokenizing line by line (in batches) gives WikiText's token stream exactly."""
    tok = data.load_tokenizer(tokenizer_dir)
    path = shared_data / "wikitext-2" / "valid.txt"
    blocks = data.load_rows(data.TextSource("text_files", files=(path,)), tok, 64).tokens
    whole = data.tokenize(tok, path.read_text())
    np.testing.assert_array_equal(blocks, data.to_blocks(whole, 64))
    assert blocks.dtype == np.uint16  # GPT-2's 50257 tokens fit in 16 bits


def test_token_cache_is_written_once_and_memory_mapped(tmp_path, tokenizer_dir, monkeypatch):
    tok = data.load_tokenizer(tokenizer_dir)
    text = tmp_path / "t.txt"
    text.write_text("One line of text.\nAnother line, with more words in it.\n" * 50)
    source = data.TextSource("text_files", files=(text,))
    first = data.load_rows(source, tok, 8, cache_dir=tmp_path / "cache").tokens
    cached = list((tmp_path / "cache").glob("tokens-*.bin"))
    assert len(cached) == 1 and cached[0].stat().st_size == 2 * len(data.load_tokens(source, tok))
    # The second load reads the cache: no tokenization at all.
    monkeypatch.setattr(data, "token_stream", lambda *a: pytest.fail("tokenized again"))
    again = data.load_rows(source, tok, 8, cache_dir=tmp_path / "cache").tokens
    np.testing.assert_array_equal(again, first)
    assert isinstance(data.load_tokens(source, tok, cache_dir=tmp_path / "cache"), np.memmap)
    # Changed text is a new cache entry (the key holds the file's size and modification time).
    monkeypatch.undo()
    text.write_text("Different text entirely, long enough for a block or two.\n" * 20)
    changed = data.load_rows(source, tok, 8, cache_dir=tmp_path / "cache").tokens
    assert len(list((tmp_path / "cache").glob("tokens-*.bin"))) == 2
    assert changed.shape != first.shape or not np.array_equal(changed, first)
